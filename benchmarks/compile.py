"""torch.compile, channels_last and bf16 autocast for sampling, each as a ratio against eager.

Every variant runs the model's full default sampling loop (sampler, steps, guidance) through
Model.with_backend; only the network call differs. Per batch size, the variants' first calls
are timed (for compile: tracing + inductor codegen, i.e. the first-call cost), then rounds run
every variant in turn, rotating the order, so drift on a shared machine hits all of them; each
ratio eager / variant is taken within a round. Each variant's output is compared with eager's
(bitwise and max |diff|). The run uses a fresh inductor cache (TORCHINDUCTOR_CACHE_DIR), so
compile's first call here is the cold cost; `--cache` then times the first call of a new process
over the cache this run filled (batch 1), i.e. what the on-disk graph cache saves a restart.

    PYTHONPATH=. python benchmarks/compile.py [--model models/mnist-cond] [--batches 1,16]
        [--rounds 3] [--threads 1] [--cache]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

import difforge
from benchmarks.common import write_result
from difforge.pipeline import resolve

VARIANTS = {
    "eager": {"backend": "eager"},
    "channels_last": {"backend": "eager", "memory_format": "channels_last"},
    "bf16_autocast": {"backend": "eager", "precision": "bfloat16"},
    "compile": {"backend": "compile"},
}


def _timed(model, plan) -> tuple[float, torch.Tensor]:
    start = time.perf_counter()
    x = model.sample_latents(plan.rows, plan)[0]
    return time.perf_counter() - start, x


def measure(models: dict, batch: int, rounds: int) -> dict:
    plan = resolve(models["eager"], {"n": batch, "seed": 0})
    first, outputs = {}, {}
    for name, m in models.items():
        first[name], outputs[name] = _timed(m, plan)
    names = list(models)
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(_timed(models[name], plan)[0])
    ref = outputs["eager"]
    out = {"batch": batch, "variants": {}}
    for name in names:
        ratios = [e / t for e, t in zip(times["eager"], times[name], strict=True)]
        steady = statistics.median(times[name])
        out["variants"][name] = {
            "first_call_s": first[name],
            "first_call_extra_s": first[name] - steady,
            "loop_s": times[name],
            "ratio_vs_eager": ratios,
            "ratio_median": statistics.median(ratios),
            "bitwise_equal": bool(torch.equal(outputs[name], ref)),
            "max_abs_diff": float((outputs[name] - ref).abs().max()),
        }
    return out


def _child_first_call(model_path: str, batch: int, threads: int) -> None:
    """Print the wall time of a compiled model's first sampling call in this process."""
    torch.set_num_threads(threads)
    m = difforge.load(model_path).with_backend("compile")
    plan = resolve(m, {"n": batch, "seed": 0})
    print(json.dumps({"first_call_s": _timed(m, plan)[0]}))


def warm_first_call(model_path: str, batch: int, threads: int) -> float:
    """compile's first call in a new process over the inductor cache this process filled."""
    cmd = [sys.executable, __file__, "--child", "--model", model_path]
    cmd += ["--batches", str(batch), "--threads", str(threads)]
    res = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])["first_call_s"]


def _summary(args, results: list[dict], cache: dict | None, sampling) -> str:
    parts = []
    for r in results:
        cells = []
        for name, v in r["variants"].items():
            if name == "eager":
                continue
            same = "bitwise" if v["bitwise_equal"] else f"|diff| {v['max_abs_diff']:.1e}"
            extra = f", first call +{v['first_call_extra_s']:.1f} s" if "compile" in name else ""
            cells.append(f"{name} {v['ratio_median']:.2f}x ({same}{extra})")
        eager = statistics.median(r["variants"]["eager"]["loop_s"])
        parts.append(f"b{r['batch']} (eager {eager:.2f} s/loop): " + ", ".join(cells))
    text = (
        f"{args.model}, {sampling.sampler} {sampling.steps} steps, guidance {sampling.guidance:g}, "
        f"{args.threads} thread(s), {args.rounds} rotating rounds, shared machine; speed-up "
        "eager/variant: " + "; ".join(parts)
    )
    if cache:
        text += (
            f"; compile's first call at b1: {cache['cold']:.1f} s with an empty inductor cache, "
            f"{cache['warm']:.1f} s in a new process over the warm cache"
        )
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--cache", action="store_true", help="also time cold/warm-cache processes")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return _child_first_call(args.model, int(args.batches), args.threads)
    torch.set_num_threads(args.threads)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="difforge-inductor-")
    base = difforge.load(args.model)
    names = ["eager", *[n for n in args.variants.split(",") if n != "eager"]]
    models = {}
    for name in names:
        options = dict(VARIANTS[name])
        models[name] = base.with_backend(options.pop("backend"), **options)
    results = [measure(models, int(b), args.rounds) for b in args.batches.split(",")]
    cache = None
    if args.cache and "compile" in models and "1" in args.batches.split(","):
        b1 = next(r for r in results if r["batch"] == 1)["variants"]["compile"]
        cache = {"cold": b1["first_call_s"], "warm": warm_first_call(args.model, 1, args.threads)}
    summary = _summary(args, results, cache, base.sampling)
    payload = {"model": args.model, "threads": args.threads, "rounds": args.rounds}
    payload |= {"results": results, "compile_cache_first_call_s": cache}
    print(write_result("compile", payload, summary))
    print(summary)
    shutil.rmtree(os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)


if __name__ == "__main__":
    main()
