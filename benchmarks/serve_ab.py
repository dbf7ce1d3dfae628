"""Lone-client latency and 16-client throughput of `difforge serve`, batch-invariance modes A/B,
against the same requests in-process.

    python -m benchmarks.serve_ab --model models/mnist-cond [--modes pad:8,chunk:2,kernels]
                                  [--rounds 3] [--duration 20] [--steps 10] [--threads 1]
    python -m benchmarks.serve_ab --offline-only [--rounds 5] [--reps 3]  # no server

Each round runs every mode (rotated: round r starts with mode r mod len(modes), so no mode is
always first on a machine whose load drifts), and then the two in-process references:
  * lone: `Model.sample` of one image, the same request a lone client sends (label, seed, steps,
    the model's guidance), back to back for --duration; its p50 is what the served lone p50 is
    compared with (the issue's target: within 1.5x);
  * batched: `sample_rows` over full guided batches of 16 images (32 forward rows, the network
    at the batch's own shape, no chunking) for --duration: the offline throughput the served
    16-client throughput is compared with (target: at least 85%); the same with the
    batch-invariant kernels (Model.with_backend("eager", kernels="invariant")) is reported beside
    it ("batched_kernels"), the default kernels' staying the denominator.
A mode is "pad:N" (batch_invariance "pad", max_batch_images N: every call padded to N forward
rows), "chunk:C" (batch_invariance "chunk", chunk_rows C, max_batch_images 32) or "kernels"
(batch_invariance "kernels", max_batch_images 32: unpadded calls, invariant kernels); "off" (the
default kernels unpadded, max_batch_images 32: not invariant, the service's ceiling). Per mode and
round: lone-client p50 (1 closed-loop client) and images/s at 16 clients; the summary gives the
median over rounds and the min-max spread, and the ratios against the same round's references.

On a shared 2-core machine the 16 client coroutines compete with the server for the CPU;
--offline-only measures the cost model without HTTP or clients: per alternating round, one guided
image and 16 guided images sampled unchunked ("natural"), chunked by each chunk:C mode and in
full padded calls for each pad:N mode. (At 16 clients a 20 s window counts whole calls of up to
16 images, so on a slow machine the served images/s moves in steps of 16 / duration.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from benchmarks.serve_load import Server, load_level


def mode_config(mode: str, steps: int, threads: int | None) -> dict:
    kind, _, n = mode.partition(":")
    cfg: dict = {"queue_size": 256, "batch_wait_ms": 10, "limits": {"max_steps": max(steps, 100)}}
    if threads:
        cfg["torch_threads"] = threads
    if kind == "pad":
        cfg |= {"batch_invariance": "pad", "limits": {**cfg["limits"], "max_batch_images": int(n)}}
    elif kind == "chunk":
        cfg |= {"batch_invariance": "chunk", "chunk_rows": int(n)}
        cfg["limits"] = {**cfg["limits"], "max_batch_images": 32}
    elif kind in ("kernels", "off"):  # "off": the default kernels unpadded, NOT invariant
        cfg |= {"batch_invariance": kind, "limits": {**cfg["limits"], "max_batch_images": 32}}
    else:
        raise SystemExit(f"unknown mode {mode!r}: pad:N, chunk:C, kernels or off")
    return cfg


async def serve_mode(model: Path, cfg: dict, duration: float, steps: int, workdir: Path) -> dict:
    import httpx

    server = Server(model, cfg, workdir)
    try:
        await server.wait_ready()
        async with httpx.AsyncClient() as c:
            batching = (await c.get(server.url + "/v1/models")).json()["models"][0]["batching"]
        if batching["mode"] != cfg["batch_invariance"]:  # the probe fell back: say so
            print(f"  the server fell back to {batching}", flush=True)
        lone = await load_level(server.url, 1, duration, steps, 30.0)
        crowd = await load_level(server.url, 16, duration, steps, 30.0)
        return {"batching": batching, "lone": lone, "crowd16": crowd}
    finally:
        server.stop()


def in_process(model_path: Path, steps: int, duration: float, threads: int | None) -> dict:
    """The lone request in-process (latencies) and offline batched throughput (16 images)."""
    from difforge.pipeline import load
    from difforge.serving.batching import BatchKey, Row, sample_rows

    if threads:
        torch.set_num_threads(threads)
    model = load(model_path)
    rng = random.Random(0)

    def one() -> float:
        t0 = time.perf_counter()
        model.sample(labels=[rng.randrange(10)], seed=rng.randrange(2**32), steps=steps)
        return time.perf_counter() - t0

    one()  # warm-up
    lone, t0 = [], time.perf_counter()
    while time.perf_counter() - t0 < duration:
        lone.append(one())
    s = model.sampling
    key = BatchKey("bench", s.sampler, steps, s.grid, tuple(model.latent_shape), True)
    conds = model.spec.resolve({"labels": [i % 10 for i in range(16)]}, 16)
    rows = [Row(seed=i, cond=c, guidance=s.guidance) for i, c in enumerate(conds)]
    out = {"lone_p50_s": statistics.median(lone), "lone_n": len(lone)}
    kernels = model.with_backend("eager", kernels="invariant")
    for name, m in (("batched", model), ("batched_kernels", kernels)):
        sample_rows(m, key, rows)  # warm-up
        images, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < duration:
            m.decode(sample_rows(m, key, rows)[0])
            images += len(rows)
        out |= {
            f"{name}_images_per_s": images / (time.perf_counter() - t0),
            f"{name}_images": images,
        }
    return out


def offline_ab(model_path: Path, modes: list[str], rounds: int, steps: int, reps: int) -> dict:
    """No server: per round, alternating, the lone guided image and 16 guided images sampled
    in-process, unchunked ("natural": the network at the batch's own shape), for each "chunk:C"
    mode chunked by C, and for each "pad:N" mode in calls padded to N forward rows (what the
    server computes, full calls); `reps` calls each, median seconds."""
    from difforge.pipeline import load
    from difforge.serving.batching import BatchKey, Row, sample_rows

    model = load(model_path)
    s = model.sampling
    key = BatchKey("bench", s.sampler, steps, s.grid, tuple(model.latent_shape), True)
    conds = model.spec.resolve({"labels": [i % 10 for i in range(16)]}, 16)
    rows = [Row(seed=i, cond=c, guidance=s.guidance) for i, c in enumerate(conds)]
    chunks = {"natural": None} | {m: int(m.split(":")[1]) if ":" in m else None for m in modes}
    kernels = model.with_backend("eager", kernels="invariant")
    times: dict[str, dict[str, list[float]]] = {m: {"lone": [], "16": []} for m in chunks}

    def draw(m: str, n: int) -> None:
        if m == "kernels":
            sample_rows(kernels, key, rows[:n])
            return
        if not m.startswith("pad"):
            sample_rows(model, key, rows[:n], chunk_rows=chunks[m])
            return
        per_call = max(1, chunks[m] // 2)  # pad:N: calls of N forward rows, N / 2 guided images
        for i in range(0, n, per_call):
            sample_rows(model, key, rows[i : min(n, i + per_call)], pad_to=per_call)

    for r in range(rounds):
        order = list(chunks)[r % len(chunks) :] + list(chunks)[: r % len(chunks)]
        for m in order:
            for n, label in ((1, "lone"), (16, "16")):
                draw(m, n)  # warm-up
                dts = []
                for _ in range(reps):
                    t0 = time.perf_counter()
                    draw(m, n)
                    dts.append(time.perf_counter() - t0)
                times[m][label].append(statistics.median(dts))
        print(f"  offline round {r}: " + ", ".join(
            f"{m} lone {times[m]['lone'][-1]:.3f} s / 16 {times[m]['16'][-1]:.3f} s" for m in chunks
        ), flush=True)  # fmt: skip
    return times


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.3g} [{min(values):.3g}-{max(values):.3g}]"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--modes", default="pad:8,chunk:2,chunk:4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=20.0, help="seconds per level")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, server and in-process")
    ap.add_argument(
        "--offline-only",
        action="store_true",
        help="no server: chunked vs natural sampling in-process (lone and 16 images)",
    )
    ap.add_argument("--reps", type=int, default=3, help="calls per measurement, --offline-only")
    args = ap.parse_args()
    modes = args.modes.split(",")
    model = Path(args.model)
    if args.offline_only:
        torch.set_num_threads(args.threads)
        load0 = os.getloadavg()[0]
        times = offline_ab(model, modes, args.rounds, args.steps, args.reps)
        nat = times["natural"]
        parts = [f"natural: lone {spread(nat['lone'])} s, 16 images {spread(nat['16'])} s"]
        for m, t in times.items():
            if m == "natural":
                continue
            lone_x = [a / b for a, b in zip(t["lone"], nat["lone"], strict=True)]
            thr = [100 * b / a for a, b in zip(t["16"], nat["16"], strict=True)]
            parts.append(
                f"{m}: lone {spread(t['lone'])} s = {spread(lone_x)}x natural, 16 images "
                f"{spread(t['16'])} s = {spread(thr)}% of natural throughput"
            )
        summary = (
            f"{args.model}, in-process, {args.steps} steps, guided, {args.threads} thread(s), "
            f"{args.rounds} alternating rounds x {args.reps} calls, medians [min-max]: "
            + "; ".join(parts)
            + f"; load {load0:.1f}-{os.getloadavg()[0]:.1f}"
        )
        payload = {"model": args.model, "steps": args.steps, "threads": args.threads,
                   "rounds": args.rounds, "reps": args.reps, "seconds": times}  # fmt: skip
        print(write_result("serve_ab_offline", payload, summary))
        return 0
    rounds: list[dict] = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            order = modes[r % len(modes) :] + modes[: r % len(modes)]
            out: dict = {"order": order, "modes": {}}
            for mode in order:
                loads.append(os.getloadavg()[0])
                cfg = mode_config(mode, args.steps, args.threads)
                res = asyncio.run(serve_mode(model, cfg, args.duration, args.steps, Path(tmp)))
                out["modes"][mode] = res
                print(f"  round {r} {mode:8s}: lone p50 {res['lone']['latency_s']['p50']:.3f} s "
                      f"(n={res['lone']['images']}), 16 clients "
                      f"{res['crowd16']['images_per_s']:.2f} img/s", flush=True)  # fmt: skip
            loads.append(os.getloadavg()[0])
            out["in_process"] = in_process(model, args.steps, args.duration, args.threads)
            ref = out["in_process"]
            print(f"  round {r} in-process: lone p50 {ref['lone_p50_s']:.3f} s "
                  f"(n={ref['lone_n']}), batched {ref['batched_images_per_s']:.2f} img/s, invariant "
                  f"kernels {ref['batched_kernels_images_per_s']:.2f} img/s", flush=True)  # fmt: skip
            rounds.append(out)
    table = {}
    for mode in modes:
        lone = [o["modes"][mode]["lone"]["latency_s"]["p50"] for o in rounds]
        thr = [o["modes"][mode]["crowd16"]["images_per_s"] for o in rounds]
        lone_x = [v / o["in_process"]["lone_p50_s"] for v, o in zip(lone, rounds, strict=True)]
        thr_f = [
            v / o["in_process"]["batched_images_per_s"] for v, o in zip(thr, rounds, strict=True)
        ]
        thr_k = [
            v / o["in_process"]["batched_kernels_images_per_s"]
            for v, o in zip(thr, rounds, strict=True)
        ]
        errors = sum(o["modes"][mode][lv]["errors"] for o in rounds for lv in ("lone", "crowd16"))
        table[mode] = {"lone_p50_s": lone, "lone_vs_in_process": lone_x,
                       "crowd16_images_per_s": thr, "crowd16_vs_offline": thr_f,
                       "crowd16_vs_offline_kernels": thr_k, "errors": errors}  # fmt: skip
    ref_lone = [o["in_process"]["lone_p50_s"] for o in rounds]
    ref_thr = [o["in_process"]["batched_images_per_s"] for o in rounds]
    ref_k = [o["in_process"]["batched_kernels_images_per_s"] for o in rounds]
    summary = (
        f"{args.model}, {args.steps} steps, guided, {args.threads} thread(s), {args.rounds} "
        f"rounds x {args.duration:g} s/level, medians [min-max]: in-process lone p50 "
        f"{spread(ref_lone)} s, offline batched(16) {spread(ref_thr)} img/s (invariant "
        f"kernels {spread(ref_k)}); "
        + "; ".join(
            f"{m}: lone p50 {spread(t['lone_p50_s'])} s = {spread(t['lone_vs_in_process'])}x "
            f"in-process, 16 clients {spread(t['crowd16_images_per_s'])} img/s = "
            f"{spread([100 * f for f in t['crowd16_vs_offline']])}% of offline "
            f"({spread([100 * f for f in t['crowd16_vs_offline_kernels']])}% of the invariant "
            "kernels' offline), "
            f"errors {t['errors']}"
            for m, t in table.items()
        )
        + f" (targets: lone <= 1.5x, 16 clients >= 85%); load {min(loads):.1f}-{max(loads):.1f}"
    )
    payload = {"model": args.model, "steps": args.steps, "threads": args.threads,
               "duration_s": args.duration, "rounds": rounds, "table": table, "load_avg": loads}  # fmt: skip
    print(write_result("serve_ab", payload, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
