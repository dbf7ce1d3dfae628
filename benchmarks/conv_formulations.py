"""Batch-invariant convolution formulations on models/mnist-cond's conv shapes: speed at one batch
size and bitwise invariance over batch sizes 1..N (the measurement behind difforge.nets.invariant).

    python -m benchmarks.conv_formulations [--batch 32] [--check 64] [--reps 3] [--threads 1]

Per layer shape (C_in -> C_out, H x W, kernel) and formulation: the minimum of --reps calls at
--batch images, and how many batch sizes 2..--check give a row that differs bitwise from that
row computed alone. Formulations: "default" (F.conv2d on NCHW, the default kernels), "per_image"
(F.conv2d at batch 1 for every image, the earlier invariant kernels), "unfold_bmm" (im2col of
the batch, then one (C', K) @ (K, HW) product per image in a bmm), "grouped" (the batch folded
into channels, groups = B), "tall_dispatch" (the batch stacked along H with zero gap rows, one
F.conv2d at batch 1: torch picks the library by size), "tall_nchw" (the same through oneDNN in
NCHW), "tall_cl" (the same channels_last through oneDNN: difforge.nets.invariant's). tall_cl
gets a channels_last input, as in the invariant net, where the activations are channels_last.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import write_result

# (C_in, C_out, H, kernel) of models/mnist-cond's convolutions (stride 1)
LAYERS = [(32, 32, 28, 3), (96, 32, 28, 3), (64, 32, 28, 3), (96, 32, 28, 1), (64, 64, 14, 3),
          (128, 64, 14, 3), (128, 64, 14, 1), (64, 64, 7, 3), (128, 64, 7, 3), (128, 64, 7, 1),
          (32, 1, 28, 3), (1, 32, 28, 3)]  # fmt: skip
MK = torch.ops.aten.mkldnn_convolution


def default(conv, x):
    return conv(x)


def per_image(conv, x):
    return torch.cat([conv(x[i : i + 1]) for i in range(x.shape[0])])


def unfold_bmm(conv, x):
    b, _, h, w = x.shape
    co, k, p = conv.out_channels, conv.kernel_size[0], conv.padding[0]
    cols = F.unfold(x, k, padding=p)  # (B, C*k*k, H*W)
    out = torch.bmm(conv.weight.reshape(co, -1).expand(b, co, -1), cols)
    return (out + conv.bias[:, None]).view(b, co, h, w)


def grouped(conv, x):
    b, c, h, w = x.shape
    wt, bias = conv.weight.repeat(b, 1, 1, 1), conv.bias.repeat(b)
    out = F.conv2d(x.reshape(1, b * c, h, w), wt, bias, padding=conv.padding, groups=b)
    return out.view(b, -1, h, w)


def _tall_nchw(conv, x, call):
    b, c, h, w = x.shape
    p = conv.padding[0]
    t = x.new_zeros(c, b, h + p, w)
    t[:, :, :h] = x.transpose(0, 1)
    out = call(t.view(1, c, b * (h + p), w))  # (1, C', B*(H+p), W)
    return out[0].view(-1, b, h + p, w)[:, :, :h].transpose(0, 1)


def tall_dispatch(conv, x):
    return _tall_nchw(conv, x, lambda t: F.conv2d(t, conv.weight, conv.bias, padding=conv.padding))


def tall_nchw(conv, x):
    p = list(conv.padding)
    return _tall_nchw(conv, x, lambda t: MK(t, conv.weight, conv.bias, p, [1, 1], [1, 1], 1))


def tall_cl(inv, x):
    return inv(x)


FORMS = {"default": default, "per_image": per_image, "unfold_bmm": unfold_bmm,
         "grouped": grouped, "tall_dispatch": tall_dispatch, "tall_nchw": tall_nchw,
         "tall_cl": tall_cl}  # fmt: skip


def main() -> int:
    from difforge.nets.invariant import batch_invariant

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--check", type=int, default=64, help="batch sizes 1..N checked (0: none)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    torch.manual_seed(0)
    total = dict.fromkeys(FORMS, 0.0)
    bad_layers = {k: 0 for k in FORMS}
    rows = []
    with torch.no_grad():
        for ci, co, h, k in LAYERS:
            conv = nn.Conv2d(ci, co, k, padding=k // 2)
            inv = batch_invariant(conv)
            pool = torch.randn(max(args.batch, args.check), ci, h, h)
            row = {"layer": f"{ci}->{co} {h}x{h} k{k}"}
            for name, f in FORMS.items():
                m = inv if name == "tall_cl" else conv
                prep = (lambda t: t.contiguous(memory_format=torch.channels_last)) if (
                    name == "tall_cl") else (lambda t: t.contiguous())  # fmt: skip
                x = prep(pool[: args.batch])
                f(m, x)
                best = float("inf")
                for _ in range(args.reps):
                    t0 = time.perf_counter()
                    f(m, x)
                    best = min(best, time.perf_counter() - t0)
                bad = 0
                if args.check:
                    alone = [f(m, prep(pool[i : i + 1])) for i in range(args.check)]
                    for b in range(2, args.check + 1):
                        out = f(m, prep(pool[:b]))
                        bad += not all(torch.equal(out[i : i + 1], alone[i]) for i in range(b))
                total[name] += best
                bad_layers[name] += bad > 0
                row[name] = {"ms": best * 1e3, "sizes_differing": bad}
            rows.append(row)
            print(f"  {row['layer']}: " + ", ".join(
                f"{n} {row[n]['ms']:.2f} ms/{row[n]['sizes_differing']}" for n in FORMS
            ), flush=True)  # fmt: skip
    summary = (
        f"models/mnist-cond's {len(LAYERS)} conv shapes, batch {args.batch}, {args.threads} "
        f"thread(s), min of {args.reps}; sum of ms (layers not invariant over sizes "
        f"1-{args.check}): " + ", ".join(
            f"{n} {total[n] * 1e3:.1f} ({bad_layers[n]})" for n in FORMS
        ) + f"; load {load0:.1f}-{os.getloadavg()[0]:.1f}"
    )  # fmt: skip
    payload = {"batch": args.batch, "check": args.check, "threads": args.threads, "rows": rows}
    print(write_result(f"conv_formulations_t{args.threads}", payload, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
