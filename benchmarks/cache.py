"""Exact result cache on a skewed request mix: hit rate and latency, cache on vs off.

Requests are drawn from `--distinct` fully-specified requests (label, seed) with Zipf weights
(rank r has weight 1 / r**s), the same sequence for both runs, sent by `--clients` concurrent
in-process clients (httpx over ASGI, no network). Reports the hit rate, p50/p95 latency of hits,
misses and everything, and requests per second, and checks that every response of the cached
run has the pixels (X-Output-SHA256) of the same request in the uncached run.

    python -m benchmarks.cache --model models/mnist-cond --requests 300 --distinct 60
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import write_result
from difforge.model import load
from difforge.serving import ModelRouter, ModelVersion, Service, ServiceConfig, create_app
from difforge.serving.config import ResultCacheConfig


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--distinct", type=int, default=60)
    ap.add_argument("--zipf", type=float, default=1.1, help="exponent s of the Zipf weights")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-bytes", type=int, default=64 << 20)
    ap.add_argument("--name", default="result_cache")
    return ap.parse_args()


def request_mix(args: argparse.Namespace) -> list[dict]:
    rng = random.Random(0)
    bodies = [
        {"labels": [i % 10], "seed": 1000 + i, "steps": args.steps} for i in range(args.distinct)
    ]
    weights = [1 / (r + 1) ** args.zipf for r in range(args.distinct)]
    return rng.choices(bodies, weights, k=args.requests)


async def drive(model_path: Path, args: argparse.Namespace, mix: list[dict], cache: bool) -> dict:
    config = ServiceConfig(
        audit_db=":memory:",
        torch_threads=args.threads,
        result_cache=ResultCacheConfig(max_bytes=args.max_bytes if cache else 0),
    )
    service = Service(config, ModelRouter(ModelVersion(load(model_path))))
    app = create_app(service)
    rows: list[tuple[int, str, float, str]] = []  # (index, x-cache, seconds, sha)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(mix)):
        queue.put_nowait(i)
    async with app.router.lifespan_context(app):
        await service.wait_ready(timeout=600)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600) as c:

            async def client() -> None:
                while not queue.empty():
                    i = queue.get_nowait()
                    t0 = time.perf_counter()
                    r = await c.post("/v1/generate", json=mix[i])
                    r.raise_for_status()
                    seconds = time.perf_counter() - t0
                    rows.append(
                        (i, r.headers.get("x-cache", "off"), seconds, r.headers["x-output-sha256"])
                    )

            t0 = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.clients)))
            wall = time.perf_counter() - t0
    return {"rows": rows, "wall_s": wall}


def _quantiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, int(0.95 * len(xs)))]
    return {"n": len(xs), "p50_ms": 1000 * statistics.median(xs), "p95_ms": 1000 * p95}


def summarize(run: dict) -> dict:
    rows = run["rows"]
    hits = [s for _, x, s, _ in rows if x == "hit"]
    misses = [s for _, x, s, _ in rows if x != "hit"]
    return {
        "hit_rate": len(hits) / len(rows),
        "requests_per_s": len(rows) / run["wall_s"],
        "wall_s": run["wall_s"],
        "all": _quantiles([s for _, _, s, _ in rows]),
        "hits": _quantiles(hits),
        "misses": _quantiles(misses),
    }


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    mix = request_mix(args)
    off = asyncio.run(drive(Path(args.model), args, mix, cache=False))
    on = asyncio.run(drive(Path(args.model), args, mix, cache=True))
    sha_off = {i: sha for i, _, _, sha in off["rows"]}
    mismatched = sum(sha != sha_off[i] for i, _, _, sha in on["rows"])
    result = {"off": summarize(off), "on": summarize(on)}
    ideal = 1 - len({str(b) for b in mix}) / len(mix)  # every repeat a hit
    a, b = result["on"], result["off"]
    summary = (
        f"{args.model}, {args.steps} steps, {args.requests} requests over {args.distinct} distinct "
        f"(Zipf s={args.zipf}), {args.clients} clients: hit rate {a['hit_rate']:.1%} "
        f"(repeats {ideal:.1%}); p50 hit {a['hits'].get('p50_ms', float('nan')):.1f} ms vs "
        f"miss {a['misses'].get('p50_ms', float('nan')):.1f} ms; all p50 {a['all']['p50_ms']:.1f} "
        f"vs {b['all']['p50_ms']:.1f} ms off, p95 {a['all']['p95_ms']:.1f} vs "
        f"{b['all']['p95_ms']:.1f} ms; {a['requests_per_s']:.2f} vs {b['requests_per_s']:.2f} "
        f"req/s; pixels differing from the uncached run: {mismatched}"
    )
    payload = {
        "args": vars(args),
        "repeat_rate": ideal,
        "pixel_mismatches": mismatched,
        **result,
    }
    print(write_result(args.name, payload, summary))
    print(summary)
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
