"""Batch-invariant kernels (difforge.nets.invariant) on a shipped model's bare network: bitwise
invariance over batch sizes and positions, and raw forward speed against the default kernels.

    python -m benchmarks.invariant_kernels [--model models/mnist-cond] [--threads 1]
                                           [--batches 1,16,32,64] [--rounds 5] [--reps 3]
                                           [--sizes 1-64]

Invariance: every row of a batch of each size in --sizes (default 1..64) is compared bitwise with
that row computed alone, for the invariant kernels and for the default ones (the control); the
rows' inputs differ (noise, c_noise, labels with the null class), so every position is covered
among different neighbours. Speed: per round (alternating which goes first), --reps forward calls
of each kernel set at each batch size, minimum seconds; the summary gives medians over rounds of
images/s and the ratio invariant / default.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from benchmarks.common import write_result


def inputs(n: int, model) -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, *model.latent_shape, generator=gen)  # (n, C, H, W)
    c_noise = torch.randn(n, generator=gen) * 0.5  # (n,), EDM's ln(sigma)/4 range
    cond = model.spec.null_batch(n)
    key = model.spec.class_key()
    if cond is not None and key is not None:
        cond[key.name] = torch.arange(n) % (key.num_classes + 1)
    return x, c_noise, cond


def rows(batch: tuple, idx: slice) -> tuple:
    x, c, cond = batch
    return x[idx], c[idx], None if cond is None else {k: v[idx] for k, v in cond.items()}


def differing_sizes(net, batch: tuple, sizes: list[int]) -> list[int]:
    with torch.no_grad():
        alone = [net(*rows(batch, slice(i, i + 1))) for i in range(max(sizes))]
        bad = []
        for b in sizes:
            out = net(*rows(batch, slice(0, b)))
            if not all(torch.equal(out[i : i + 1], alone[i]) for i in range(b)):
                bad.append(b)
    return bad


def parse_sizes(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out += list(range(int(lo), int(hi or lo) + 1))
    return out


def main() -> int:
    from difforge.nets.invariant import batch_invariant
    from difforge.pipeline import load

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batches", default="1,16,32,64")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--sizes", default="1-64", help="batch sizes checked for invariance")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    model = load(args.model)
    nets = {"default": model.net.eval(), "invariant": batch_invariant(model.net).eval()}
    sizes = parse_sizes(args.sizes)
    batch = inputs(max(sizes), model)
    bad = {k: differing_sizes(net, batch, sizes) for k, net in nets.items()}
    print(f"  sizes whose rows differ from alone: {bad}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    times: dict[str, dict[int, list[float]]] = {k: {b: [] for b in batches} for k in nets}
    with torch.no_grad():
        for r in range(args.rounds):
            order = list(nets) if r % 2 == 0 else list(nets)[::-1]
            for b in batches:
                x = inputs(b, model)
                for k in order:
                    nets[k](*x)  # warm-up at this shape
                    best = float("inf")
                    for _ in range(args.reps):
                        t0 = time.perf_counter()
                        nets[k](*x)
                        best = min(best, time.perf_counter() - t0)
                    times[k][b].append(best)
            print(f"  round {r}: " + ", ".join(
                f"B={b} default {times['default'][b][-1] * 1e3:.1f} ms / invariant "
                f"{times['invariant'][b][-1] * 1e3:.1f} ms" for b in batches), flush=True)  # fmt: skip
    parts = []
    for b in batches:
        ratio = [d / i for d, i in zip(times["default"][b], times["invariant"][b], strict=True)]
        d, i = statistics.median(times["default"][b]), statistics.median(times["invariant"][b])
        parts.append(
            f"B={b}: default {b / d:.1f} img/s, invariant {b / i:.1f} img/s = "
            f"{statistics.median(ratio):.2f} [{min(ratio):.2f}-{max(ratio):.2f}]x"
        )
    summary = (
        f"{args.model} bare net, {args.threads} thread(s), forward only, {args.rounds} "
        f"alternating rounds x min of {args.reps}; invariance over batch sizes {args.sizes} (every "
        f"row vs alone): invariant kernels differ at {bad['invariant'] or 'no size'}, default "
        f"kernels at {len(bad['default'])} of {len(sizes)} sizes; speed (medians, invariant/"
        f"default throughput [min-max]): " + "; ".join(parts) + f"; load "
        f"{load0:.1f}-{os.getloadavg()[0]:.1f}"
    )
    payload = {"model": args.model, "threads": args.threads, "sizes": sizes,
               "differing_sizes": bad, "seconds": {k: {str(b): v for b, v in t.items()}
                                                  for k, t in times.items()}}  # fmt: skip
    print(write_result(f"invariant_kernels_t{args.threads}", payload, summary))
    return 0 if not bad["invariant"] else 1


if __name__ == "__main__":
    sys.exit(main())
