"""Fallback under load: does the circuit breaker keep degraded-allowed traffic within its latency
SLO under overload, where the same service without it does not? And does it close once load falls?

    python -m benchmarks.breaker [--net small] [--steps 20] [--degraded-steps 4] [--clients 16]
                                 [--duration 30] [--warmup 10] [--calm 60] [--rounds 2]
                                 [--slo-factor 2] [--threads 1] [--forward-delay 0]

A random-weight model (benchmarks.serve_load.make_model, --net) is served in-process (httpx over
ASGI, no network) with one torch thread. Calibration: one client, full-step requests (--steps,
guided, one image each), before each round: the median latency T; that round's SLO is
--slo-factor x T. Overload: --clients closed-loop clients, every request `"allow_degraded": true`, for --warmup + --duration seconds;
the p95 latency of the requests sent after the warm-up (the breaker needs a window of slow
requests before it opens) is compared with the SLO, with the breaker (degrade "allowed") and
without (degrade "never", otherwise the same service), alternating A/B/B/A... over --rounds so
that both see the same machine load. After each breaker run one client keeps sending for
--calm seconds: the breaker must close (the time it took is reported).

--forward-delay adds a sleep to every network forward (compute that does not contend for the
CPU, like an accelerator): on a machine shared with other work it makes the comparison about the
breaker rather than the neighbours.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import torch

from benchmarks.common import write_result
from benchmarks.serve_load import make_model
from difforge.model import load
from difforge.serving import ModelRouter, ModelVersion, Service, ServiceConfig, create_app
from difforge.serving.breaker import BreakerConfig, p95


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--net", default="small", choices=("tiny", "small", "mnist"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--degraded-steps", type=int, default=4)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--warmup", type=float, default=10.0)
    ap.add_argument("--calm", type=float, default=60.0, help="at least the longest cool-down")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--slo-factor", type=float, default=2.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--forward-delay", type=float, default=0.0, help="seconds per forward")
    ap.add_argument("--name", default="breaker")
    return ap.parse_args()


class _Delayed:
    def __init__(self, denoiser, delay: float):
        self.denoiser, self.delay = denoiser, delay

    def __call__(self, x, sigma, cond=None):
        time.sleep(self.delay)
        return self.denoiser(x, sigma, cond)


def breaker_config(args: argparse.Namespace, slo: float, degrade: str) -> BreakerConfig:
    return BreakerConfig(
        degrade=degrade,
        latency_slo_s=slo,
        window_s=10.0,
        min_samples=8,
        cooldown_s=5.0,
        probes=1,
        close_ratio=0.7,
        degraded_steps=args.degraded_steps,
    )


class Bench:
    """One in-process service and its client."""

    def __init__(self, model_path: Path, args: argparse.Namespace, breaker: BreakerConfig):
        config = ServiceConfig(
            audit_db=":memory:", torch_threads=args.threads, warmup_steps=1, breaker=breaker
        )
        self.args = args
        self.service = Service(config, ModelRouter(ModelVersion(load(model_path))))
        self.app = create_app(self.service)

    async def __aenter__(self) -> Bench:
        self._life = self.app.router.lifespan_context(self.app)
        await self._life.__aenter__()
        await self.service.wait_ready(timeout=600)
        if self.args.forward_delay > 0:
            model = self.service.router.production.model
            model.denoiser = _Delayed(model.denoiser, self.args.forward_delay)
        transport = httpx.ASGITransport(app=self.app, client=("127.0.0.1", 40000))
        self.client = httpx.AsyncClient(transport=transport, base_url="http://b", timeout=600)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.client.aclose()
        await self._life.__aexit__(*exc)

    async def clients(self, n: int, seconds: float, salt: int) -> list[dict]:
        """`n` closed-loop clients for `seconds`: one row per answered request."""
        rows: list[dict] = []
        t0 = time.monotonic()
        end = t0 + seconds

        async def client(i: int) -> None:
            rng = random.Random(salt * 1000 + i)
            while time.monotonic() < end:
                body = {
                    "labels": [rng.randrange(10)],
                    "seed": rng.randrange(2**31),
                    "steps": self.args.steps,
                    "allow_degraded": True,
                }
                sent = time.monotonic()
                r = await self.client.post("/v1/generate", json=body)
                rows.append(
                    {
                        "sent_s": sent - t0,
                        "latency_s": time.monotonic() - sent,
                        "status": r.status_code,
                        "degraded": r.headers.get("x-difforge-degraded"),
                        "state": self.service.fallback.breaker.state,
                    }
                )

        await asyncio.gather(*(client(i) for i in range(n)))
        return rows


async def calibrate(model_path: Path, args: argparse.Namespace) -> float:
    """Median latency of one client's full-step requests (no breaker)."""
    async with Bench(model_path, args, breaker_config(args, 1e9, "never")) as b:
        await b.clients(1, 2.0, salt=0)  # warm the path
        rows = await b.clients(1, 6.0, salt=1)
    return statistics.median(r["latency_s"] for r in rows)


async def overload(model_path: Path, args, slo: float, degrade: str, salt: int) -> dict:
    async with Bench(model_path, args, breaker_config(args, slo, degrade)) as b:
        rows = await b.clients(args.clients, args.warmup + args.duration, salt)
        calm = None
        if degrade != "never":
            cooldown = b.service.fallback.breaker.cooldown_s  # doubled by each reopening
            t0 = time.monotonic()
            calm_rows = []
            while (
                time.monotonic() - t0 < args.calm and b.service.fallback.breaker.state != "closed"
            ):
                calm_rows += await b.clients(1, 1.0, salt + 7)
            closed = b.service.fallback.breaker.state == "closed"
            calm = {
                "closed": closed,
                "closed_after_s": time.monotonic() - t0 if closed else None,
                "requests": len(calm_rows),
                "cooldown_s_when_load_fell": cooldown,
            }
        text = b.service.metrics.exposition().decode()
    steady = [r for r in rows if r["sent_s"] >= args.warmup and r["status"] == 200]
    lat = [r["latency_s"] for r in steady]
    return {
        "degrade": degrade,
        "requests": len(rows),
        "steady_requests": len(steady),
        "errors": sum(r["status"] != 200 for r in rows),
        "p50_s": statistics.median(lat) if lat else None,
        "p95_s": p95(lat) if lat else None,
        "p95_all_s": p95([r["latency_s"] for r in rows]),
        "degraded_share_steady": sum(r["degraded"] is not None for r in steady)
        / max(1, len(steady)),
        "full_route_steady": sum(r["degraded"] is None for r in steady),
        "within_slo": bool(lat) and p95(lat) <= slo,
        "images_per_s_steady": len(steady) / args.duration,
        "calm": calm,
        "transitions": {
            line.split('"')[1]: float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("difforge_breaker_transitions_total{")
        },
    }


def main() -> int:
    args = parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model_path = make_model(Path(tmp) / "model", args.net)
        runs = []
        for r in range(args.rounds):  # A B, then B A: each mode sees early and late load
            t_full = asyncio.run(calibrate(model_path, args))  # per round: the load drifts
            slo = args.slo_factor * t_full
            print(
                f"round {r}: one client, {args.steps} steps, median {t_full:.3f} s: SLO {slo:.3f} s"
            )
            order = ("allowed", "never") if r % 2 == 0 else ("never", "allowed")
            for degrade in order:
                run = asyncio.run(overload(model_path, args, slo, degrade, salt=r + 1))
                run |= {"round": r, "slo_s": slo, "t_full_s": t_full}
                runs.append(run)
                print(
                    f"  {degrade:8s}: p95 {run['p95_s']:.3f} s (SLO {slo:.3f}), p50 "
                    f"{run['p50_s']:.3f}, degraded {run['degraded_share_steady']:.0%}, "
                    f"n={run['steady_requests']}, calm {run['calm']}",
                    flush=True,
                )
    on = [x for x in runs if x["degrade"] == "allowed"]
    off = [x for x in runs if x["degrade"] == "never"]

    def fmt(xs: list[dict], key: str = "p95_s") -> str:
        return "/".join(f"{x[key]:.2f}" for x in xs)

    def count(xs: list[dict], key: str) -> str:
        return "/".join(str(x[key]) for x in xs)

    closes = [x["calm"]["closed_after_s"] for x in on if x["calm"] and x["calm"]["closed"]]
    summary = (
        "machine shared with other engineers' runs (A/B alternate to see the same load); "
        f"random {args.net} U-Net, {args.steps} steps guided, cheap route {args.degraded_steps} "
        f"steps, {args.clients} closed-loop clients all allow_degraded, {args.warmup:.0f} s warm-up"
        f" + {args.duration:.0f} s measured, {args.rounds} A/B rounds alternating"
        + (f", forward delay {args.forward_delay * 1000:.0f} ms" if args.forward_delay else "")
        + f"; SLO per round = {args.slo_factor} x one client's median full-step latency measured "
        f"before it: {fmt(on, 'slo_s')} s; p95 with breaker {fmt(on)} s (n={count(on, 'steady_requests')}, "
        f"{sum(x['within_slo'] for x in on)}/{len(on)} within SLO, degraded "
        f"{statistics.mean(x['degraded_share_steady'] for x in on):.1%}, full-route requests "
        f"{count(on, 'full_route_steady')}; p95 including the warm-up {fmt(on, 'p95_all_s')} s), "
        f"without {fmt(off)} s (n={count(off, 'steady_requests')}, "
        f"{sum(not x['within_slo'] for x in off)}/{len(off)} over SLO); breaker closed after load "
        f"fell in {len(closes)}/{len(on)} runs"
        + (f" ({'/'.join(f'{c:.1f}' for c in closes)} s)" if closes else "")
    )
    payload = {"args": vars(args), "runs": runs}
    print(write_result(args.name, payload, summary))
    print(summary)
    met = all(x["within_slo"] for x in on) and not any(x["within_slo"] for x in off)
    return 0 if met else 1


if __name__ == "__main__":
    raise SystemExit(main())
