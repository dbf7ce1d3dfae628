"""A U-Net denoiser network in the style of ADM (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs").

forward(x, c_noise, cond) -> (B, out_channels, H, W). Architecture only: what c_noise means and
what the output predicts (eps, x0, v, velocity, EDM's F) is decided by the adapter in
difforge.core.denoiser that wraps the net.

cond is None or a mapping with optional
  "labels":  (B,) int64 in [0, num_classes]; index num_classes is the learned null class used for
             classifier-free guidance (Ho & Salimans 2022). Missing labels mean the null class.
  "context": (B, L, context_dim) float for cross-attention; missing means no cross-attention.
  "slots":   (B, slot_grid ** 2) int64 in [0, slot_classes]: one token per cell of a slot_grid x
             slot_grid layout (row-major), e.g. the class in each quadrant of a scene with an
             "empty" token; index slot_classes is the learned null. Missing slots mean the null.
             Each cell's token embedding is broadcast over its cell of the image and added after
             conv_in (so the net knows *where* each slot is), and the summed position-specific
             embeddings are added to the noise embedding (so every block knows *what* is there).
  "context_mask": (B, L) bool, True for real tokens (padding is not attended to); optional.
  "pooled":  (B, context_dim) float, a pooled text vector added to the noise embedding (GLIDE,
             Nichol et al. 2022, Sec. 2.3); optional.
  "low_res": (B, low_res_channels + 1, h, w) float: a low-resolution image (the first channels,
             in [-1, 1], noise-augmented) and its augmentation level (the last channel, constant
             per image; -1 = no image, the null of guidance). The image is upsampled to (H, W)
             (bilinear) and concatenated to x before conv_in; the level is embedded and added to
             the noise embedding (Ho et al. 2022, "Cascaded Diffusion Models", Sec. 4.2).
             Missing means the null (zeros, level -1).
  "inpaint": (B, inpaint_channels, H, W) float, extra input channels concatenated to x before
             conv_in (an inpainting model's mask and known pixels, Rombach et al. 2022, Sec. 4.5);
             required when inpaint_channels > 0. Its meaning is the conditioning spec's
             (difforge.pipeline.conditioning.MaskedImageKey), not the net's.
  "guidance": (B,) float, the guidance scale w of a guidance-distilled student (Meng et al. 2023,
             "On Distillation of Guided Diffusion Models", Sec. 4.1), embedded like the noise
             level and added to the noise embedding; only when guidance_embed is set; missing
             means w = 1 (the plain conditional model).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets.jsonconfig import JsonConfig
from difforge.nets.layers import (
    AttentionBlock,
    Downsample,
    NoiseEmbedding,
    ResBlock,
    SlotEmbedding,
    Upsample,
    conv_nd,
    zero_module,
)
from difforge.nets.text_encoder import attention


class LevelsConfig(JsonConfig):
    """Checks and level sizes shared by the 2-D and 1-D U-Net configs (JSON via JsonConfig).

    A subclass is a frozen dataclass with UNetConfig's fields, naming its full-resolution size field
    in SIZE_FIELD ("image_size" for H = W, "length" for T).
    """

    SIZE_FIELD: ClassVar[str] = "image_size"

    def __post_init__(self) -> None:
        for name in ("channel_mults", "attention_resolutions"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        self._check_types()
        self._check_shapes()

    def _check_types(self) -> None:
        positive = ("in_channels", "out_channels", self.SIZE_FIELD, "base_channels", "head_dim")
        for name in (*positive, "num_res_blocks", "norm_groups", "emb_mult"):
            _check_int(name, getattr(self, name), minimum=0 if name == "num_res_blocks" else 1)
        _check_int("num_classes", self.num_classes, minimum=0)
        if hasattr(self, "slot_grid"):  # the 2-D U-Net's slot conditioning
            self._check_slots()
        if self.context_dim is not None:
            _check_int("context_dim", self.context_dim, minimum=1)
        if not (isinstance(self.channel_mults, tuple) and self.channel_mults):
            raise InvalidArgumentError(
                f"channel_mults must be a non-empty tuple, got {self.channel_mults!r}"
            )
        for m in self.channel_mults:
            _check_int("channel_mults entry", m, minimum=1)
        if not isinstance(self.attention_resolutions, tuple):
            raise InvalidArgumentError(
                f"attention_resolutions must be a tuple, got {self.attention_resolutions!r}"
            )
        for r in self.attention_resolutions:
            _check_int("attention_resolutions entry", r, minimum=1)
        if not (isinstance(self.dropout, int | float) and 0.0 <= self.dropout < 1.0):
            raise InvalidArgumentError(f"dropout must be in [0, 1), got {self.dropout!r}")

    def _check_shapes(self) -> None:
        factor, size = 2 ** (len(self.channel_mults) - 1), getattr(self, self.SIZE_FIELD)
        if size % factor:
            raise InvalidArgumentError(
                f"{self.SIZE_FIELD} {size} is not divisible by {factor}, which "
                f"{len(self.channel_mults)} levels (channel_mults) need"
            )
        sizes = self.resolutions
        unknown = sorted(set(self.attention_resolutions) - set(sizes))
        if unknown:
            raise InvalidArgumentError(
                f"attention_resolutions {unknown} are not feature-map sizes of this net; "
                f"its sizes are {list(sizes)}"
            )
        for size, ch in zip(sizes, self.level_channels, strict=True):
            if ch % self.norm_groups:
                raise InvalidArgumentError(
                    f"norm_groups {self.norm_groups} does not divide {ch} channels (level of size {size})"
                )
            if size in self.attention_resolutions and ch % self.head_dim:
                raise InvalidArgumentError(
                    f"head_dim {self.head_dim} does not divide {ch} channels at attention "
                    f"resolution {size}"
                )
        if self.base_channels % self.norm_groups:
            raise InvalidArgumentError(
                f"norm_groups {self.norm_groups} does not divide base_channels {self.base_channels}"
            )

    @property
    def resolutions(self) -> tuple[int, ...]:
        """Feature-map size (H, or T) of each level, e.g. (28, 14, 7)."""
        size = getattr(self, self.SIZE_FIELD)
        return tuple(size // 2**i for i in range(len(self.channel_mults)))

    @property
    def level_channels(self) -> tuple[int, ...]:
        """Channels of each level, base_channels * mult."""
        return tuple(self.base_channels * m for m in self.channel_mults)


@dataclass(frozen=True)
class UNetConfig(LevelsConfig):
    """Hyperparameters of `UNet`; stored as JSON next to the weights (`to_dict`/`from_dict`)."""

    in_channels: int = 1  # channels of the input image x
    out_channels: int = 1  # channels of the prediction (usually = in_channels)
    image_size: int = 28  # H = W of x; must be divisible by 2 ** (len(channel_mults) - 1)
    base_channels: int = 64  # channels at full resolution
    # channels of level i = base_channels * channel_mults[i]; H and W halve between levels
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 2  # residual blocks per level on the way down (one more on the way up)
    # feature-map sizes (H) where attention runs, the middle block included
    attention_resolutions: tuple[int, ...] = (7,)
    head_dim: int = 32  # channels per attention head; heads = channels // head_dim
    dropout: float = 0.0  # dropout probability inside residual blocks
    # classes 0..num_classes-1 plus the null class num_classes; 0 = unconditional (labels ignored)
    num_classes: int = 0
    context_dim: int | None = None  # cross-attention context width; None = no cross-attention
    # a learned, zero-initialised position embedding on the cross-attention queries (see
    # layers.AttentionBlock): lets positional prompts ("in the top left") bind to places
    query_positions: bool = False
    # g: a g x g grid of learned queries cross-attends to the context tokens; each cell's result
    # is added over its cell after conv_in (as slot_grid's map is) and, summed, to the embedding:
    # a text-to-layout path for positional prompts (see `TextLayout`); 0 = none
    text_layout_grid: int = 0
    norm_groups: int = 32  # GroupNorm groups; must divide every channel count
    emb_mult: int = 4  # noise/class embedding width = base_channels * emb_mult (ADM uses 4)
    slot_grid: int = 0  # side of the slot layout (2: four quadrants); 0 = no slot conditioning
    slot_classes: int = 0  # tokens a slot can hold (classes + "empty"); the null is one more
    # channels of a low-resolution conditioning image (super-resolution); 0 = none
    low_res_channels: int = 0
    inpaint_channels: int = 0  # extra input channels from cond["inpaint"]; 0 = none
    # a guidance-scale input (cond["guidance"]) for a guidance-distilled student; its embedding's
    # last layer starts at zero, so a student made from a teacher starts as the teacher
    guidance_embed: bool = False

    def _check_slots(self) -> None:
        _check_int("inpaint_channels", self.inpaint_channels, minimum=0)
        _check_int("slot_grid", self.slot_grid, minimum=0)
        _check_int("slot_classes", self.slot_classes, minimum=0)
        if bool(self.slot_grid) != bool(self.slot_classes):
            raise InvalidArgumentError("slot_grid and slot_classes must both be 0 or both >= 1")
        _check_int("low_res_channels", self.low_res_channels, minimum=0)
        _check_int("text_layout_grid", self.text_layout_grid, minimum=0)
        if self.text_layout_grid and (
            self.context_dim is None or self.image_size % self.text_layout_grid
        ):
            raise InvalidArgumentError(
                f"text_layout_grid {self.text_layout_grid} needs a context_dim and must divide "
                f"image_size {self.image_size}"
            )
        if self.slot_grid and self.image_size % self.slot_grid:
            raise InvalidArgumentError(
                f"image_size {self.image_size} is not divisible by slot_grid {self.slot_grid}"
            )


def _check_int(name: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")


class Stage(nn.Module):
    """A residual block, then attention (self, and cross when there is a context) if given one."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None):
        super().__init__()
        self.res = res
        self.attn = attn

    def forward(
        self, h: Tensor, emb: Tensor, context: Tensor | None, mask: Tensor | None = None
    ) -> Tensor:
        h = self.res(h, emb)
        return h if self.attn is None else self.attn(h, context, mask)


class UNet(nn.Module):
    """U-Net with FiLM residual blocks, attention at chosen resolutions, class and text conditioning.

    Encoder: num_res_blocks stages per level, a stride-2 downsample between levels; middle: two
    stages; decoder: num_res_blocks + 1 stages per level, each fed the matching encoder
    activation by concatenation (Ronneberger et al. 2015), nearest upsampling between levels.

    Args:
        config: the architecture (see `UNetConfig`).
    """

    kind = "unet"
    dims: ClassVar[int] = 2  # convolution axes: 2 for images (B, C, H, W); UNet1D sets 1

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        emb_dim = cfg.base_channels * cfg.emb_mult
        self.noise_embed = NoiseEmbedding(cfg.base_channels, emb_dim)
        # The last row is the learned null class for classifier-free guidance.
        self.class_embed = nn.Embedding(cfg.num_classes + 1, emb_dim) if cfg.num_classes else None
        self.slot_embed = None
        if getattr(cfg, "slot_grid", 0):
            self.slot_embed = SlotEmbedding(
                cfg.slot_grid, cfg.slot_classes, cfg.base_channels, emb_dim
            )
        self.pooled_embed = nn.Linear(cfg.context_dim, emb_dim) if cfg.context_dim else None
        grid = getattr(cfg, "text_layout_grid", 0)
        self.text_layout = (
            TextLayout(grid, cfg.context_dim, cfg.base_channels, emb_dim, cfg.head_dim)
            if grid and cfg.context_dim
            else None
        )
        self.low_res = getattr(cfg, "low_res_channels", 0)
        # the augmentation level of the low-res image, embedded like the noise level
        self.level_embed = NoiseEmbedding(cfg.base_channels, emb_dim) if self.low_res else None
        self.inpaint_channels = getattr(cfg, "inpaint_channels", 0)
        in_ch = cfg.in_channels + self.low_res + self.inpaint_channels
        self.guidance_embed = None
        if getattr(cfg, "guidance_embed", False):
            self.guidance_embed = NoiseEmbedding(cfg.base_channels, emb_dim)
            zero_module(self.guidance_embed.mlp[-1])
        self.conv_in = conv_nd(self.dims, in_ch, cfg.base_channels, 3, padding=1)
        self.down, skip_channels = self._build_encoder(emb_dim)
        ch, bottom = skip_channels[-1], cfg.resolutions[-1]  # the encoder's output
        self.mid = nn.ModuleList(
            [self._stage(ch, ch, bottom, emb_dim), self._stage(ch, ch, bottom, emb_dim, attn=False)]
        )
        self.up = self._build_decoder(emb_dim, ch, skip_channels)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cfg.base_channels * cfg.channel_mults[0])
        self.conv_out = zero_module(
            conv_nd(self.dims, cfg.level_channels[0], cfg.out_channels, 3, padding=1)
        )

    def _stage(self, in_ch: int, out_ch: int, size: int, emb_dim: int, attn: bool = True) -> Stage:
        cfg = self.config
        res = ResBlock(in_ch, out_ch, emb_dim, cfg.norm_groups, cfg.dropout, self.dims)
        if not (attn and size in cfg.attention_resolutions):
            return Stage(res, None)
        positions = size**self.dims if getattr(cfg, "query_positions", False) else 0
        attn = AttentionBlock(out_ch, cfg.head_dim, cfg.norm_groups, cfg.context_dim, positions)
        return Stage(res, attn)

    def _build_encoder(self, emb_dim: int) -> tuple[nn.ModuleList, list[int]]:
        """Encoder blocks, and the channels of every activation kept for the decoder."""
        cfg = self.config
        blocks, ch = nn.ModuleList(), cfg.base_channels
        skip_channels = [ch]  # conv_in's output
        for level, (size, out_ch) in enumerate(
            zip(cfg.resolutions, cfg.level_channels, strict=True)
        ):
            for _ in range(cfg.num_res_blocks):
                blocks.append(self._stage(ch, out_ch, size, emb_dim))
                ch = out_ch
                skip_channels.append(ch)
            if level < len(cfg.channel_mults) - 1:
                blocks.append(Downsample(ch, self.dims))
                skip_channels.append(ch)
        return blocks, skip_channels

    def _build_decoder(self, emb_dim: int, ch: int, skip_channels: list[int]) -> nn.ModuleList:
        """Decoder blocks from `ch` bottom channels, consuming `skip_channels` from the end."""
        cfg = self.config
        blocks = nn.ModuleList()
        for level in reversed(range(len(cfg.channel_mults))):
            out_ch, size = cfg.level_channels[level], cfg.resolutions[level]
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(self._stage(ch + skip_channels.pop(), out_ch, size, emb_dim))
                ch = out_ch
            if level > 0:
                blocks.append(Upsample(ch, self.dims))
        return blocks

    def embed(self, c_noise: Tensor, cond: Mapping[str, Tensor] | None, batch: int) -> Tensor:
        """Noise embedding plus class embedding (null class when labels are missing): (B, emb_dim)."""
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise InvalidArgumentError(
                f"c_noise must have shape ({batch},), got {tuple(c_noise.shape)}"
            )
        emb = self.noise_embed(c_noise)  # (B, emb_dim)
        if self.class_embed is not None:
            labels = None if cond is None else cond.get("labels")
            if labels is None:
                labels = torch.full((batch,), self.config.num_classes, device=c_noise.device)
            _check_labels(labels, batch, self.config.num_classes)
            emb = emb + self.class_embed(labels.long())  # (B, emb_dim)
        pooled = None if cond is None else cond.get("pooled")
        if self.pooled_embed is not None and pooled is not None:
            emb = emb + self.pooled_embed(pooled.to(emb.dtype))  # (B, emb_dim)
        if self.guidance_embed is not None:
            w = None if cond is None else cond.get("guidance")
            w = torch.ones(batch, device=c_noise.device) if w is None else w.float()
            if w.shape != (batch,):
                raise InvalidArgumentError(
                    f"guidance must have shape ({batch},), got {tuple(w.shape)}"
                )
            emb = emb + self.guidance_embed(w)  # (B, emb_dim)
        return emb

    def _inpaint(self, cond: Mapping[str, Tensor] | None, x: Tensor) -> Tensor:
        extra = None if cond is None else cond.get("inpaint")
        want = (x.shape[0], self.inpaint_channels, *x.shape[2:])
        if extra is None or tuple(extra.shape) != want:
            got = None if extra is None else tuple(extra.shape)
            raise InvalidArgumentError(f"this net needs cond['inpaint'] of shape {want}, got {got}")
        return extra.to(x.dtype)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,) -> (B, out_channels, H, W) in x's dtype."""
        emb = self.embed(c_noise, cond, x.shape[0]).to(x.dtype)  # (B, emb_dim)
        slot_map = None
        if self.slot_embed is not None:
            slot_emb, slot_map = self.slot_embed(cond, x.shape[0], x.shape[-1])
            emb = emb + slot_emb.to(x.dtype)
        context = None if cond is None or self.config.context_dim is None else cond.get("context")
        mask = None
        if context is not None:
            _check_context(context, x.shape[0], self.config.context_dim)
            mask = cond.get("context_mask")  # (B, L) bool or None
        if self.level_embed is not None:
            low, level = self._low_res(cond, x)  # (B, c, H, W), (B,)
            emb = emb + self.level_embed(level).to(x.dtype)
            x = torch.cat([x, low.to(x.dtype)], dim=1)  # (B, in + c, H, W)
        if self.inpaint_channels:
            x = torch.cat([x, self._inpaint(cond, x)], dim=1)  # (B, in + inpaint_channels, H, W)
        if self.text_layout is not None and context is not None:
            layout_emb, layout_map = self.text_layout(context, mask, x.shape[-1])
            emb = emb + layout_emb.to(x.dtype)
            slot_map = layout_map if slot_map is None else slot_map + layout_map
        h = self.conv_in(x)  # (B, base, H, W)
        if slot_map is not None:
            h = h + slot_map.to(h.dtype)  # (B, base, H, W): each slot's embedding over its cell
        skips = [h]
        for block in self.down:
            h = block(h, emb, context, mask) if isinstance(block, Stage) else block(h)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb, context, mask)  # (B, ch, H / 2^(L-1), W / 2^(L-1))
        for block in self.up:
            if isinstance(block, Stage):
                h = block(
                    torch.cat([h, skips.pop()], dim=1), emb, context, mask
                )  # cat: (B, ch + skip, h, w)
            else:
                h = block(h)
        return self.conv_out(nn.functional.silu(self.norm_out(h)))  # (B, out_channels, H, W)

    def _low_res(self, cond: Mapping[str, Tensor] | None, x: Tensor) -> tuple[Tensor, Tensor]:
        """cond["low_res"] -> (image upsampled to x's size (B, c, H, W), level (B,))."""
        b, c = x.shape[0], self.low_res
        low = None if cond is None else cond.get("low_res")
        if low is None:  # the null: no image
            return x.new_zeros(b, c, *x.shape[2:]), x.new_full((b,), -1.0)
        if low.ndim != 4 or low.shape[:2] != (b, c + 1) or not low.is_floating_point():
            raise InvalidArgumentError(
                f"low_res must be a float tensor ({b}, {c + 1}, h, w), got {low.dtype} "
                f"{tuple(low.shape)}"
            )
        up = nn.functional.interpolate(
            low[:, :c].float(), size=tuple(x.shape[2:]), mode="bilinear", align_corners=False
        )  # (B, c, H, W)
        return up, low[:, c, 0, 0].float()  # level: the constant last channel


class TextLayout(nn.Module):
    """Text tokens -> a g x g layout: a spatial map (B, base, H, W) and a global embedding.

    One learned query per cell attends to the (B, L, C) tokens (padding masked), an MLP follows;
    zero-initialised outputs, so a warm-started net starts unchanged. Like `SlotEmbedding`'s, its
    map is added after conv_in, so "a 7 in the top left" can place a 7 where a slot would.
    """

    def __init__(self, grid: int, width: int, base: int, emb_dim: int, head_dim: int):
        super().__init__()
        self.grid, self.heads = grid, max(1, width // head_dim)
        self.queries = nn.Parameter(torch.randn(grid * grid, width) * 0.02)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.mlp = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 4 * width), nn.GELU())
        self.local = zero_module(nn.Linear(4 * width, base))
        self.glob = zero_module(nn.Linear(4 * width, emb_dim))

    def forward(self, context: Tensor, mask: Tensor | None, size: int) -> tuple[Tensor, Tensor]:
        b, g = context.shape[0], self.grid
        q = self.q(self.queries.to(context.dtype)).expand(b, -1, -1)  # (B, g*g, C)
        k, v = self.kv(context).chunk(2, dim=2)  # (B, L, C) x2
        h = self.mlp(attention(q, k, v, self.heads, mask))  # (B, g*g, 4C)
        local = self.local(h).transpose(1, 2).reshape(b, -1, g, g)  # (B, base, g, g) row-major
        return self.glob(h).sum(1), F.interpolate(local, size=(size, size), mode="nearest")


def _check_labels(labels: Tensor, batch: int, num_classes: int) -> None:
    if labels.shape != (batch,) or labels.is_floating_point():
        raise InvalidArgumentError(
            f"labels must be an integer tensor of shape ({batch},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if torch.compiler.is_compiling():
        # Reading the values is a data-dependent branch that torch.compile and torch.export
        # cannot trace; there the embedding lookup still rejects an index out of range.
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi > num_classes:
        raise InvalidArgumentError(
            f"labels must lie in [0, {num_classes}] ({num_classes} = null class), got [{lo}, {hi}]"
        )


def _check_context(context: Tensor, batch: int, context_dim: int | None) -> None:
    if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != context_dim:
        raise InvalidArgumentError(
            f"context must have shape ({batch}, L, {context_dim}), got {tuple(context.shape)}"
        )


# Default for MNIST (28x28x1, 10 classes), chosen for quality per CPU-second: an hour of CPU
# training is compute-bound, so the FLOPs go where MNIST's structure is (32 channels at 14x14,
# 64 at 7x7 with attention, 2 heads of 32) and the 28x28 level stays thin (16 channels).
# 1.03M params, 0.208 GFLOP per image forward. Train step (fwd + bwd + Adam) at batch 64,
# torch 2.13 CPU, process CPU time on one thread of the shared 2-core dev box (two runs):
#   base 16, (1, 2, 4), 2 blocks: 1.03M params, 0.208 GFLOP,  790-820 ms   <- this config
#   base 32, (1, 2, 2), 1 block:  1.19M params, 0.380 GFLOP, 1190-1230 ms
#   base 24, (1, 2, 4), 2 blocks: 2.32M params, 0.465 GFLOP, 1480-1570 ms
#   base 32, (1, 2, 2), 2 blocks: 1.74M params, 0.555 GFLOP, 1720-1950 ms
#   base 48, (1, 2, 2), 2 blocks: 3.91M params, 1.244 GFLOP, 3550 ms
#   base 64, (1, 2, 2), 1 block:  4.75M params, 1.514 GFLOP, 4280 ms
# So ~4.5k steps (290k images, ~5 epochs) per hour on one free core, up to ~2x on two.
MNIST_UNET = UNetConfig(
    in_channels=1,
    out_channels=1,
    image_size=28,
    base_channels=16,
    channel_mults=(1, 2, 4),
    num_res_blocks=2,
    attention_resolutions=(7,),
    head_dim=32,
    norm_groups=8,
    num_classes=10,
)
