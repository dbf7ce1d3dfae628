"""The full sampling loop with the network under onnxruntime vs eager torch, on one model.

The model's own defaults (sampler, steps, guidance: CFG doubles the network batch) draw `batch`
images; only the bare network call differs (Model.with_backend("onnxruntime")), so the adapter,
guidance and sampler are difforge's in both. Rounds alternate eager and onnxruntime, so drift on a
shared machine hits both; the ratio is taken pair by pair. Both use the same thread count.

    PYTHONPATH=. python benchmarks/onnx_loop.py [--model models/mnist-cond] [--batches 1,16]
        [--rounds 5] [--threads 1] [--onnx net.onnx]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

import difforge
from benchmarks.common import write_result
from difforge.pipeline import resolve
from difforge.pipeline.backends import export_model_onnx


def _timed(model, plan) -> tuple[float, float, torch.Tensor]:
    """(wall s, process CPU s, latents) of one full sampling call."""
    wall, cpu = time.perf_counter(), time.process_time()
    x = model.sample_latents(plan.rows, plan)[0]
    return time.perf_counter() - wall, time.process_time() - cpu, x


def _median(values) -> float:
    return statistics.median(values)


def measure(eager, ort, batch: int, rounds: int) -> dict:
    """Alternate eager and onnxruntime loops; per-pair ratios eager / onnxruntime."""
    plan = resolve(eager, {"n": batch, "seed": 0})
    _timed(eager, plan), _timed(ort, plan)  # warm-up: allocators, onnxruntime's first run
    rows = []
    for r in range(rounds):
        pair = [("eager", eager), ("onnxruntime", ort)]
        if r % 2:
            pair.reverse()  # A B, B A, ...: neither always runs first
        got = {name: _timed(m, plan) for name, m in pair}
        rows.append(got)
    diff = float((rows[-1]["eager"][2] - rows[-1]["onnxruntime"][2]).abs().max())
    out = {"batch": batch, "network_batch": batch * (2 if plan.guided else 1), "max_abs_diff": diff}
    for name in ("eager", "onnxruntime"):
        out[f"{name}_wall_s"] = [g[name][0] for g in rows]
        out[f"{name}_cpu_s"] = [g[name][1] for g in rows]
    out["ratio_wall"] = [g["eager"][0] / g["onnxruntime"][0] for g in rows]
    out["ratio_cpu"] = [g["eager"][1] / g["onnxruntime"][1] for g in rows]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--onnx", default=None, help="an existing export [default: export now]")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    eager = difforge.load(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = args.onnx or export_model_onnx(eager, Path(tmp) / "net.onnx").path
        ort = eager.with_backend("onnxruntime", onnx_path=str(path), threads=args.threads)
        results = [measure(eager, ort, int(b), args.rounds) for b in args.batches.split(",")]
    s = eager.sampling
    parts = []
    for r in results:
        parts.append(
            f"b{r['batch']}: eager {_median(r['eager_wall_s']):.2f} s vs onnxruntime "
            f"{_median(r['onnxruntime_wall_s']):.2f} s per loop, eager/ort "
            f"{_median(r['ratio_wall']):.2f}x wall ({min(r['ratio_wall']):.2f}-"
            f"{max(r['ratio_wall']):.2f}), {_median(r['ratio_cpu']):.2f}x CPU; "
            f"max |diff| {r['max_abs_diff']:.1e}"
        )
    summary = (
        f"{args.model}, {s.sampler} {s.steps} steps, guidance {s.guidance:g}, "
        f"{args.threads} thread(s), {args.rounds} alternating rounds, shared machine: "
        + "; ".join(parts)
    )
    payload = {
        "model": args.model,
        "sampling": s.model_dump(),
        "threads": args.threads,
        "rounds": args.rounds,
        "results": results,
    }
    print(write_result("onnx_loop", payload, summary))
    print(summary)


if __name__ == "__main__":
    main()
