"""Batch-invariant execution of a network: every row's arithmetic is the same whatever the batch.

CPU GEMM and convolution libraries pick their algorithm by shape: MKL's sgemm takes a different
path for a 1-row input than for a 16-row one, oneDNN picks a different convolution kernel (and
NNPACK takes over at 16 images), so one image's output changes in its last bits with the number
of images beside it (difforge.serving.invariance has the measurements). Batch-invariant kernels
(He et al. 2025, "Defeating Nondeterminism in LLM Inference", Thinking Machines Lab) fix this by
making every reduction's order independent of the batch size. Here that is done per op, with
each image computed at one shape that does not move:

* Linear on one vector per image (the time embedding, FiLM scale/shift): a batched GEMM with
  the batch as bmm's batch dimension, one (1, K) @ (K, N) product per image;
* Linear on tokens (attention projections): the same, one (T, K) @ (K, N) product per image;
* Conv1d / Conv2d: the whole batch as ONE tall image at batch 1. The images are stacked along H
  (Conv1d: along T) with zero rows between them, as many as the image's own zero padding needs
  (and a multiple of the stride), so no receptive field crosses into a neighbour; the tall
  image, channels_last, goes through oneDNN's convolution (aten.mkldnn_convolution, called
  directly so that torch's own dispatch, which sends inputs under 20480 elements and 1x1 kernels
  at 1 thread to its im2col path, cannot switch library with the height), and each image's
  output rows are a view of the tall output. oneDNN's direct convolution reduces every output
  pixel over (C_in, kh, kw) in an order that does not depend on the image's height (or on which
  explicit zero rows it reads: they add exact zeros); its output stays channels_last;
* GroupNorm on a channels_last input of >= 256 pixels: per-channel sums over H*W (vertical,
  vectorised over C) added up per group, then one addcmul (InvariantGroupNorm): torch's
  channels_last kernel is 2-5x slower than its NCHW one here, and above 1024 pixels splits an
  image's pixels over threads; smaller maps and NCHW inputs use torch's kernel;
* LayerNorm, softmax, scaled_dot_product_attention, elementwise ops, embeddings: torch's CPU
  kernels already reduce within one image (a row, a head's keys) in an order that depends only
  on that image's shape; they are used as they are.

Why the tall image (`python -m benchmarks.conv_formulations`: models/mnist-cond's 12 conv
shapes, batch 32, 1 thread, load 3.7-3.9, sum of the layers' times; invariance checked bitwise
over batch sizes 1..64, every position): the default kernels 59 ms, 6 layers not invariant (1x1
convs and the 14x14 / 7x7 maps move); the previous formulation, the library conv once per
image, 84 ms; im2col (F.unfold) + one bmm per image 254 ms (invariant; the unfold dominates);
the batch folded into a grouped conv (groups = B) 72 ms, 5 layers not invariant (oneDNN's
grouped kernels change with B); the tall image through torch's dispatch 66 ms, not invariant at
14x14 and 7x7 (the dispatch switch above); the tall image in NCHW forced to oneDNN 68 ms, not
invariant for two 1x1 shapes; the tall image channels_last through oneDNN 59 ms, invariant at
every shape: oneDNN's brgemm convolution reads and writes channels_last without the NCHW <->
blocked reorders the default path pays on every call. On the whole bare net (python -m
benchmarks.invariant_kernels, benchmarks/RESULTS.md) this runs at 0.88-0.90x the default
kernels' throughput at batch 16-64 (0.84-1.04x over rounds; 0.57-0.70x one image per call) and
0.66x at batch 1 (more small ops per layer; 0.84x at batch 2 in an A/B of forwards).

`batch_invariant(net)` returns a copy of `net` whose Linear / Conv / GroupNorm layers use these
kernels, sharing the very same parameter tensors (no weight is copied, the state_dict keys and
the safetensors file are unchanged). The copy has no mutable state, so one copy serves any number of
threads. Its outputs differ from the eager net's in the last bits (a different summation order,
not a different function: ~1e-6 relative), and do not depend on the batch: tests/unit/
test_invariant_kernels.py checks batch sizes 1..64 and every row position at 1 and 2 threads,
and the serving probe checks the whole sampler call before a version serves with it.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn


class InvariantLinear(nn.Linear):
    """nn.Linear as one GEMM per image: (B, K) or (B, T, K) -> (B, N) or (B, T, N)."""

    def forward(self, x: Tensor) -> Tensor:
        b, k, n = x.shape[0], self.in_features, self.out_features
        rows = x.reshape(b, -1, k)  # (B, T, K), T = 1 for a vector per image
        w = self.weight.t().expand(b, k, n)  # (B, K, N), a view: each image's own GEMM
        out = torch.bmm(rows, w)  # (B, T, N)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], n)


def _per_image(conv: nn.Module, x: Tensor) -> Tensor:
    """`conv`'s own convolution called at batch 1 for every image: (B, C, ...) -> (B, C', ...)."""
    if x.shape[0] == 1:
        return conv._conv_forward(x, conv.weight, conv.bias)
    outs = [conv._conv_forward(x[i : i + 1], conv.weight, conv.bias) for i in range(x.shape[0])]
    return torch.cat(outs)


def _stackable(conv: nn.Module, x: Tensor) -> bool:
    """Whether `conv` can run as one tall image: float32 on the CPU with oneDNN present, zero
    padding given as numbers (other cases run one image per call)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and conv.padding_mode == "zeros"
        and not isinstance(conv.padding, str)
    )


def _gap(size: int, k: int, s: int, p: int, d: int) -> tuple[int, int]:
    """Zero rows after each image along the stacked axis, and that axis' output length.

    The gap covers what the image's own zero padding would (p rows above the next image, and the
    rows past its end that its last output reads) and makes each block a multiple of the stride,
    so that every image's outputs start on an output row of their own.
    """
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    below = max(0, (out - 1) * s - p + d * (k - 1) - (size - 1))
    gap = max(p, below)
    return gap + (-(size + gap)) % s, out


def _weight_channels_last(conv: nn.Conv2d) -> Tensor:
    """`conv.weight` channels_last, as oneDNN reads it with a channels_last input: torch would
    copy it on every call (30-80 us per layer at batch 1-2). Kept while the weight is the same
    tensor at the same version (an in-place update, e.g. load_state_dict, makes a new copy);
    while autograd records, the copy is made per call (a graph node, so gradients flow)."""
    w = conv.weight
    if torch.is_grad_enabled():
        return w.contiguous(memory_format=torch.channels_last)
    kept = conv.__dict__.get("_weight_cl")
    if kept is None or kept[0] is not w or kept[1] != w._version:
        kept = (w, w._version, w.detach().contiguous(memory_format=torch.channels_last))
        conv.__dict__["_weight_cl"] = kept  # same values: a cache, not state
    return kept[2]


def _stacked2d(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """Conv2d of a batch as one image of height B * (H + gap), channels_last, by oneDNN.

    (B, C, H, W) -> (B, C', H', W'), a channels_last view of the tall output.
    """
    b, c, h, w = x.shape
    (kh, _), (sh, sw), (ph, pw), (dh, dw) = (
        conv.kernel_size, conv.stride, conv.padding, conv.dilation
    )  # fmt: skip
    gap, oh = _gap(h, kh, sh, ph, dh)
    block = h + gap  # rows per image in the tall input; block // sh rows per image out
    if gap:
        tall = x.new_empty(b, block, w, c)  # NHWC
        tall[:, :h] = x.permute(0, 2, 3, 1)
        tall[:, h:] = 0  # the gap rows
    else:
        tall = x.permute(0, 2, 3, 1).contiguous()  # a no-op when x is channels_last
    tall = tall.view(1, b * block, w, c).permute(0, 3, 1, 2)  # (1, C, B*block, W) one image
    weight = _weight_channels_last(conv)
    out = _MKLDNN_CONV(tall, weight, conv.bias, [ph, pw], [sh, sw], [dh, dw], conv.groups)
    # channels_last out for channels_last in (a no-op then); a 1-channel input can come out NCHW
    out = out.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)  # (1, R, W', C')
    _, _, ow, co = out.shape
    per = block // sh * ow * co  # one image's block of output rows
    return out.as_strided(
        (b, co, oh, ow), (per, 1, ow * co, co), out.storage_offset()
    )  # image i's rows i*block/sh .. + H'


def _stacked1d(conv: nn.Conv1d, x: Tensor) -> Tensor:
    """Conv1d of a batch as one sequence of length B * (T + gap): (B, C, T) -> (B, C', T')."""
    b, c, t = x.shape
    (k,), (s,), (p,), (d,) = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    gap, ot = _gap(t, k, s, p, d)
    block = t + gap
    tall = x.new_zeros(c, b, block)
    tall[:, :, :t] = x.transpose(0, 1)
    out = _MKLDNN_CONV(
        tall.view(1, c, b * block), conv.weight, conv.bias, [p], [s], [d], conv.groups
    )[0].contiguous()  # (C', R)
    co, r = out.shape
    return out.as_strided((b, co, ot), (block // s, r, 1), out.storage_offset())


_MKLDNN_CONV = torch.ops.aten.mkldnn_convolution  # one library, whatever the shape (see above)


class InvariantConv2d(nn.Conv2d):
    """nn.Conv2d with the batch stacked into one tall image (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return _stacked2d(self, x) if _stackable(self, x) else _per_image(self, x)


class InvariantConv1d(nn.Conv1d):
    """nn.Conv1d with the batch stacked into one long sequence (see the module docstring)."""

    def forward(self, x: Tensor) -> Tensor:
        return _stacked1d(self, x) if _stackable(self, x) else _per_image(self, x)


class InvariantGroupNorm(nn.GroupNorm):
    """nn.GroupNorm that keeps a channels_last input channels_last, at NCHW's speed.

    torch's channels_last GroupNorm kernel walks each (image, group) with a stride of C (5x
    slower than the NCHW kernel here); this one takes per-channel sums over H*W (vertical,
    vectorised over C), adds them up per group and normalises in one addcmul. Every sum is
    within one image, in an order set by that image's shape. Other layouts use torch's kernel.
    """

    def forward(self, x: Tensor) -> Tensor:
        if (
            not x.is_cpu
            or x.dim() != 4
            or x.stride(1) != 1
            or x.shape[1] == 1
            or x.shape[2] * x.shape[3] < 256
        ):
            return super().forward(x)  # torch's: NCHW, or small maps (its per-group path < 1024)
        b, c, h, w = x.shape
        g = self.num_groups
        xv = x.permute(0, 2, 3, 1)  # (B, H, W, C), C innermost
        n = h * w * (c // g)
        s1 = xv.sum(dim=(1, 2)).view(b, g, -1).sum(-1)  # (B, G)
        s2 = (xv * xv).sum(dim=(1, 2)).view(b, g, -1).sum(-1)  # (B, G)
        mean = (s1 / n)[:, :, None]  # (B, G, 1)
        var = ((s2 / n)[:, :, None] - mean * mean).clamp_min(0)  # (B, G, 1)
        scale = torch.rsqrt(var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight.view(g, -1)  # (B, G, C/G)
        else:
            scale = scale.expand(b, g, c // g)
        shift = -mean * scale
        if self.bias is not None:
            shift = shift + self.bias.view(g, -1)
        scale, shift = scale.reshape(b, c), shift.reshape(b, c)
        return torch.addcmul(shift[:, None, None], xv, scale[:, None, None]).permute(0, 3, 1, 2)


# exact classes only: a subclass (e.g. a LoRA layer) may compute differently and is left alone
_SWAPS: dict[type[nn.Module], type[nn.Module]] = {
    nn.Linear: InvariantLinear,
    nn.Conv2d: InvariantConv2d,
    nn.Conv1d: InvariantConv1d,
    nn.GroupNorm: InvariantGroupNorm,
}


def batch_invariant(net: nn.Module) -> nn.Module:
    """A copy of `net` that runs every Linear / Conv / GroupNorm layer with batch-invariant kernels.

    Args:
        net: any torch module (a difforge net, or a denoiser adapter around one).

    Returns:
        A module of the same structure and state_dict keys whose parameters and buffers are
        `net`'s own tensors (shared, not copied); `net` itself is not changed.
    """
    shared = {id(t): t for t in (*net.parameters(), *net.buffers())}
    new = copy.deepcopy(net, memo=shared)
    for module in new.modules():
        swap = _SWAPS.get(type(module))
        if swap is not None:
            module.__class__ = swap
    return new


def is_batch_invariant(net: nn.Module) -> bool:
    """Whether `net` has gone through `batch_invariant` (no eager Linear/Conv/GroupNorm left)."""
    return not any(type(m) in _SWAPS for m in net.modules())


__all__ = [
    "InvariantConv1d",
    "InvariantConv2d",
    "InvariantGroupNorm",
    "InvariantLinear",
    "batch_invariant",
    "is_batch_invariant",
]
