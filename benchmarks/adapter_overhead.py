"""Sampler + adapter cost per step with a null network (it returns its input), no network time.

What `sampler_overhead` measures around a real UNet, without the UNet: the loop, the adapter
(time input, input scale / EDM coefficients, x0 conversion) and `sample`'s per-call setup, for
`ModelDenoiser` (eps, DiscreteVP) and `EDMPrecond` (VE), with the adapter reused across calls
(loaded, as the server keeps it) or built per call (fresh). Reported: min and median over calls
of the wall time per step of one `sample` call at batch 1.

    python -m benchmarks.adapter_overhead [--calls 60] [--steps 20] [--samplers euler,dpmpp_2m]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import write_result
from difforge.core import DiscreteVP, EDMPrecond, ModelDenoiser, VEProcess, get_sigmas
from difforge.samplers import sample


def null_net(x, t, cond=None):
    return x


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=60)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--samplers", default="euler,dpmpp_2m")
    args = ap.parse_args()
    torch.set_num_threads(1)
    vp, ve = DiscreteVP(), VEProcess()
    adapters = {
        "model_eps": (lambda: ModelDenoiser(null_net, vp, "eps"), get_sigmas("karras", args.steps, process=vp)),
        "edm": (lambda: EDMPrecond(null_net, 0.5), get_sigmas("karras", args.steps, process=ve)),
    }  # fmt: skip
    rows: dict = {}
    for kind, (make, sigmas) in adapters.items():
        for mode in ("loaded", "fresh"):
            for name in args.samplers.split(","):
                kept = make()
                per_step = []
                for _ in range(args.calls + 1):  # the first call warms up and is dropped
                    den = kept if mode == "loaded" else make()
                    start = time.perf_counter()
                    sample(den, sigmas, shape=(1, 28, 28), seeds=[0], sampler=name)
                    per_step.append((time.perf_counter() - start) / args.steps)
                per_step = per_step[1:]
                rows[f"{kind}:{mode}:{name}"] = {
                    "us_per_step_min": 1e6 * min(per_step),
                    "us_per_step_median": 1e6 * statistics.median(per_step),
                }
    for key, row in rows.items():
        print(
            f"  {key:28s} min {row['us_per_step_min']:.1f} us/step, median {row['us_per_step_median']:.1f}"
        )
    summary = f"null net, batch 1, {args.steps} steps, {args.calls} calls each; us/step min (median): " + ", ".join(
        f"{k} {r['us_per_step_min']:.1f} ({r['us_per_step_median']:.1f})" for k, r in rows.items()
    )  # fmt: skip
    out = write_result(
        "adapter_overhead",
        {"steps": args.steps, "calls": args.calls, "rows": rows},
        summary,
    )
    print(summary)
    print("wrote", out)


if __name__ == "__main__":
    main()
