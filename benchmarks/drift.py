"""Drift monitor curve: the drift gauges of a healthy and a degraded model over the same requests.

The healthy model is `--model` as shipped; the degraded one is the same weights told the wrong
noise level (the network sees sigma * `--noise-scale`, a realistic adapter / preconditioning bug
whose images still look like strokes). Both serve the same `--requests` requests of
`--per-request` images (classes cycle, seeds fixed) through POST /v1/generate in-process; after
each request from the second on, the service's drift monitor compares its window (at most
`--window` images) with the MNIST test reference. Reports, per model, FID / KID / class-mix TV at
every window size, the first request at which each crosses `--kid-max` / `--fid-max`, and the cost
of one check (features on the sampler thread + statistics).

    python -m benchmarks.drift --requests 40 --per-request 8 --window 256 --steps 10
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import write_result
from difforge.model import load
from difforge.serving import ModelRouter, ModelVersion, Service, ServiceConfig, create_app
from difforge.serving.drift import DriftConfig


class WrongNoiseScale:
    """The network is told sigma * k instead of sigma (k = 0.5: half the true noise level)."""

    def __init__(self, denoiser, k: float):
        self.denoiser, self.k = denoiser, k

    def __call__(self, x, sigma, cond=None):
        return self.denoiser(x, sigma * self.k, cond)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--per-request", type=int, default=8)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--noise-scale", type=float, default=0.5)
    ap.add_argument("--kid-max", type=float, default=2000.0)
    ap.add_argument("--fid-max", type=float, default=250.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="drift")
    return ap.parse_args()


async def curve(args: argparse.Namespace, degraded: bool) -> dict:
    drift = DriftConfig(
        enabled=True,
        window=args.window,
        min_samples=2 * args.per_request,
        interval_s=3600.0,  # checked by hand after each request: one point per window size
        kid_max=args.kid_max,
        fid_max=args.fid_max,
    )
    config = ServiceConfig(audit_db=":memory:", torch_threads=args.threads, drift=drift)
    model = load(Path(args.model))
    if degraded:
        model.denoiser = WrongNoiseScale(model.denoiser, args.noise_scale)
    service = Service(config, ModelRouter(ModelVersion(model)))
    app = create_app(service)
    points, sampling_s = [], 0.0
    async with app.router.lifespan_context(app):
        await service.wait_ready(timeout=600)
        transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 40000))
        async with httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600) as c:
            for r in range(args.requests):
                n = args.per_request
                body = {"labels": [(n * r + i) % 10 for i in range(n)], "seed": 1000 * r, "n": n}
                t0 = time.perf_counter()
                (await c.post("/v1/generate", json=body | {"steps": args.steps})).raise_for_status()
                sampling_s += time.perf_counter() - t0
                if r == 0:
                    continue
                (result,) = (await service.drift.check(service.engine)).values()
                exceeded = service.drift.exceeded(result)
                keep = ("samples", "fid", "kid", "kid_std", "class_tv", "class_chi2_p", "seconds")
                points.append({"request": r + 1, **{k: result[k] for k in keep}, "over": exceeded})
    metrics = ("kid", "fid")
    first = {m: next((p["request"] for p in points if p["over"].get(m)), None) for m in metrics}
    return {"points": points, "first_request_over": first, "sampling_s": sampling_s}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    healthy = asyncio.run(curve(args, degraded=False))
    degraded = asyncio.run(curve(args, degraded=True))
    h, d = healthy["points"], degraded["points"]
    check_s = sorted(p["seconds"] for p in h + d)
    last_h, last_d = h[-1], d[-1]
    summary = (
        f"{args.model}, {args.steps} steps, guidance default, {args.requests} requests x "
        f"{args.per_request} images, window {args.window}, degraded = sigma x {args.noise_scale}; "
        f"KID healthy max {_fmt(max(p['kid'] for p in h))} over all checks, degraded min "
        f"{_fmt(min(p['kid'] for p in d))} (kid_max {args.kid_max:g}: degraded over from request "
        f"{degraded['first_request_over']['kid']}, healthy over at "
        f"{healthy['first_request_over']['kid']}); at {last_h['samples']} images FID healthy "
        f"{_fmt(last_h['fid'])} vs degraded {_fmt(last_d['fid'])} (fid_max {args.fid_max:g}: "
        f"degraded over from request {degraded['first_request_over']['fid']}, healthy "
        f"{healthy['first_request_over']['fid']}); class TV {_fmt(last_h['class_tv'])}; "
        f"one check {1000 * check_s[len(check_s) // 2]:.0f} ms median, "
        f"{1000 * check_s[-1]:.0f} ms max"
    )
    payload = {"args": vars(args), "healthy": healthy, "degraded": degraded}
    print(write_result(args.name, payload, summary))
    print(summary)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
