"""Load test of `difforge serve` over loopback: throughput and latency by concurrency, with and
without batching, against offline batched sampling; plus an overload run.

    python -m benchmarks.serve_load [--duration 60] [--levels 1,4,16,64] [--net small]
                                    [--steps 10] [--threads N] [--model PATH] [--quick]
                                    [--only-invariance]

For each configuration (batching on: max_batch_images = --batch; off: max_batch_images = 1) a
fresh server process is started on 127.0.0.1 and each level runs `levels[i]` closed-loop clients
(asyncio + httpx) for --duration seconds: one image per request, random label and seed, guidance
on. Reported per level: images/s, latency p50/p95/p99, errors by status. "offline" runs the same
sampler calls in-process (`sample_rows`, full batches) for --duration: the ceiling the server is
measured against; "in-process lone" samples the lone client's request with `Model.sample` for
--duration, and the summary puts each configuration's 1-client p50 beside it (the batching mode
is the service default, batch_invariance "kernels"; benchmarks/serve_ab.py compares the modes
A/B). The kill run SIGKILLs the server under 16 clients, restarts it on the same audit
log and polls readiness from process start (it must say not-ready until warm), then checks the
audit hash chain. The overload run sends 200 clients at a server with a queue of 8: rejected
requests must come back fast (503 latency), every accepted one must complete, and the server's
RSS must stay bounded (VmRSS before/after, VmHWM).

The client shares the CPU with the server: on a 2-core machine that costs the server some
throughput, the same for every configuration. Run on a quiet machine; --quick (3 s per level,
levels 1 and 16, no invariance table) only checks that the benchmark works. In-flight requests
get a bounded drain after each level (--duration, at least 30 s; 15 s with --quick).

--only-invariance measures, per torch thread count and batch size, whether one image's network
output depends on its batch size or its position in the batch, and whether sampling alone vs
batched changes pixels (see difforge/serving/invariance.py for what the service does about it).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result

NETS = {
    # 28x28 single-channel, 10 classes: "small" is what a 2-core CPU serves interactively.
    "tiny": {"image_size": 8, "base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
             "attention_resolutions": [4], "head_dim": 8, "norm_groups": 4},
    "small": {"image_size": 28, "base_channels": 16, "channel_mults": [1, 2], "num_res_blocks": 1,
              "attention_resolutions": [], "head_dim": 16, "norm_groups": 8},
    "mnist": {"image_size": 28, "base_channels": 64, "channel_mults": [1, 2, 2], "num_res_blocks": 2,
              "attention_resolutions": [7], "head_dim": 64, "norm_groups": 32},
}  # fmt: skip


def make_model(folder: Path, net: str) -> Path:
    """A random-weight model folder (throughput does not depend on the weights' values, but
    batch invariance does: a net whose output is exactly zero is trivially invariant)."""
    from difforge.nets import UNetConfig, build_net
    from difforge.pipeline import ModelConfig, NetSpec, SamplingDefaults, save_model

    cfg = UNetConfig(in_channels=1, out_channels=1, num_classes=10, **NETS[net])
    torch.manual_seed(0)
    model = build_net("unet", cfg)
    with torch.no_grad():  # the output layers start at zero: perturb them so outputs vary
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    size = cfg.image_size
    config = ModelConfig(
        name=f"bench-{net}",
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization="eps",
        num_classes=10,
        image_shape=(1, size, size),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=10, guidance=2.0),
    )
    return save_model(folder, config, model.state_dict(), f"# bench-{net}\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS", "VmHWM")):
            key, value = line.split(":")
            out[key] = int(value.split()[0])
    return out


class Server:
    """`difforge serve` in a subprocess, on a free loopback port."""

    def __init__(self, model: Path, config: dict, workdir: Path, audit_db: Path | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.audit_db = audit_db or workdir / f"audit-{self.port}.db"
        cfg_path = workdir / f"serve-{self.port}.json"
        cfg_path.write_text(json.dumps({**config, "audit_db": str(self.audit_db)}))
        cmd = [sys.executable, "-m", "difforge.cli", "serve", "--model", str(model),
               "--port", str(self.port), "--config", str(cfg_path)]  # fmt: skip
        self.log = open(workdir / f"server-{self.port}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)

    async def wait_ready(self, timeout: float = 300) -> None:
        import httpx

        end = time.monotonic() + timeout
        async with httpx.AsyncClient() as c:
            while time.monotonic() < end:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server exited with {self.proc.returncode}")
                try:
                    if (await c.get(self.url + "/v2/health/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
        raise TimeoutError("server did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p95": None, "p99": None}
    if len(values) == 1:
        return {"p50": values[0], "p95": values[0], "p99": values[0]}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": q[49], "p95": q[94], "p99": q[98]}


async def load_level(url: str, clients: int, duration: float, steps: int, drain: float) -> dict:
    """`clients` closed-loop clients for `duration` s; every request is one guided image.

    Requests still in flight at the end get `drain` more seconds, then their clients hang up
    (the server cancels them) so that a level never runs unbounded. Throughput counts the
    images answered inside the `duration` window.
    """
    import httpx

    latencies: list[float] = []
    rejected: list[float] = []
    statuses: dict[int, int] = {}
    transport: dict[str, int] = {}
    in_window = [0]
    end = time.monotonic() + duration
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)

    async def client(i: int, c: httpx.AsyncClient) -> None:
        rng = random.Random(i)
        while time.monotonic() < end:
            body = {"labels": [rng.randrange(10)], "seed": rng.randrange(2**32), "steps": steps}
            t0 = time.perf_counter()
            try:
                r = await c.post(url + "/v1/generate", json=body)
                code = r.status_code
            except httpx.HTTPError as e:  # status 0; which error says whether it was accepted
                code = 0
                transport[type(e).__name__] = transport.get(type(e).__name__, 0) + 1
            dt = time.perf_counter() - t0
            statuses[code] = statuses.get(code, 0) + 1
            if code == 200:
                latencies.append(dt)
                in_window[0] += time.monotonic() <= end
            elif code == 503:
                rejected.append(dt)
                retry = float(r.headers.get("retry-after", "1"))
                await asyncio.sleep(min(retry, max(0.0, end - time.monotonic())))

    t0 = time.monotonic()
    async with httpx.AsyncClient(limits=limits, timeout=duration + drain + 60) as c:
        tasks = [asyncio.create_task(client(i, c)) for i in range(clients)]
        _, pending = await asyncio.wait(tasks, timeout=duration + drain)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    return {
        "clients": clients,
        "seconds": duration,
        "drain_seconds": time.monotonic() - t0 - duration,
        "images": len(latencies),
        "images_per_s": in_window[0] / duration,
        "latency_s": percentiles(sorted(latencies)),
        "rejected_latency_s": percentiles(sorted(rejected)),
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "transport_errors": transport,
        "unfinished_at_drain_end": len(pending),
        "errors": sum(v for k, v in statuses.items() if k != 200) + len(pending),
    }


def offline(model_path: Path, batch: int, steps: int, duration: float, threads: int | None) -> dict:
    """Full guided batches through `sample_rows` in-process: the server's ceiling."""
    from difforge.pipeline import load
    from difforge.serving.batching import BatchKey, Row, sample_rows

    if threads:
        torch.set_num_threads(threads)
    model = load(model_path)
    per_call = max(1, batch // 2)  # guided: two forward rows per image
    key = BatchKey("bench", "dpmpp_2m", steps, "karras", tuple(model.image_shape), True)
    conds = model.spec.resolve({"labels": [i % 10 for i in range(per_call)]}, per_call)
    rows = [Row(seed=i, cond=c, guidance=2.0) for i, c in enumerate(conds)]
    sample_rows(model, key, rows)  # warm-up
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < duration:
        sample_rows(model, key, rows)
        images += per_call
    wall = time.perf_counter() - t0
    return {
        "images_per_call": per_call,
        "images": images,
        "seconds": wall,
        "images_per_s": images / wall,
    }


def in_process_lone(model_path: Path, steps: int, duration: float, threads: int | None) -> dict:
    """The lone client's request in-process: `Model.sample` of one image (a label, a seed,
    --steps, the model's guidance), back to back for `duration`: what the served lone-client
    p50 is compared with."""
    from difforge.pipeline import load

    if threads:
        torch.set_num_threads(threads)
    model = load(model_path)
    rng = random.Random(0)
    latencies = []
    for i in range(10**6):
        t0 = time.perf_counter()
        model.sample(labels=[rng.randrange(10)], seed=rng.randrange(2**32), steps=steps)
        if i:  # the first call is a warm-up
            latencies.append(time.perf_counter() - t0)
        if sum(latencies) >= duration:
            break
    return {"images": len(latencies), **percentiles(sorted(latencies))}


def invariance(model_path: Path, threads: list[int], sizes: list[int], steps: int) -> list[dict]:
    """Does one image's network output depend on its batch? Per thread count and batch size:
    a probe image at every position among different neighbours (one forward), compared with
    position 0 (same size) and with a batch of 1; then whole guided sampling runs, batched as
    they come vs alone, compared in uint8 pixels."""
    from difforge.pipeline import load, to_uint8
    from difforge.serving.batching import BatchKey, Row, sample_rows
    from difforge.serving.invariance import probe_positions

    model = load(model_path)
    shape = tuple(model.image_shape)
    x0 = torch.randn((1, *shape), generator=torch.Generator().manual_seed(1)) * 3
    sigma = 2.0

    def forward(m: int, pos: int, salt: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(salt)
        x = torch.randn((m, *shape), generator=g) * 3
        labels = torch.randint(0, 11, (m,), generator=g)
        x[pos], labels[pos] = x0[0], 3
        with torch.no_grad():
            return model.denoiser(x, torch.full((m,), sigma), {"labels": labels})[pos]

    rows, before = [], torch.get_num_threads()
    key = BatchKey("bench", "dpmpp_2m", steps, "karras", shape, True)
    conds = model.spec.resolve({"labels": [i % 10 for i in range(8)]}, 8)
    targets = [Row(seed=7 + i, cond=c, guidance=2.0 + 0.25 * i) for i, c in enumerate(conds)]
    try:
        for t in threads:
            torch.set_num_threads(t)
            alone_fwd = forward(1, 0, 0)
            for m in sizes:
                outs = {p: forward(m, p, p + 1) for p in probe_positions(m)}
                ref = outs[0]
                rows.append({
                    "threads": t, "batch": m,
                    "positions_differing": [p for p, o in outs.items() if not torch.equal(o, ref)],
                    "max_abs_diff_vs_batch_1": float((ref - alone_fwd).abs().max()),
                })  # fmt: skip
            alone = torch.cat([sample_rows(model, key, [r])[0] for r in targets])
            batched = sample_rows(model, key, targets)[0]
            ua, ub = to_uint8(alone), to_uint8(batched)
            rows.append({
                "threads": t, "sampling": f"{len(targets)} guided images, {steps} steps",
                "float_max_abs_diff": float((alone - batched).abs().max()),
                "uint8_pixels_differing": int((ua != ub).sum()),
                "images_differing": int((ua != ub).flatten(1).any(1).sum()),
            })  # fmt: skip
            print(f"  invariance threads={t}: {rows[-len(sizes) - 1 : -1]} {rows[-1]}", flush=True)
    finally:
        torch.set_num_threads(before)
    return rows


def invariance_summary(rows: list[dict]) -> str:
    fwd = [r for r in rows if "batch" in r]
    runs = [r for r in rows if "sampling" in r]
    by_size = max(r["max_abs_diff_vs_batch_1"] for r in fwd)
    positional = [(r["threads"], r["batch"]) for r in fwd if r["positions_differing"]]
    return (
        f"one forward, batch > 1 vs batch 1: max abs diff {by_size:.2g}; rows depending on their "
        f"position (threads, batch): {positional or 'none'}; sampling alone vs batched: "
        + ", ".join(
            f"{r['threads']} thr float {r['float_max_abs_diff']:.2g} / "
            f"{r['uint8_pixels_differing']} uint8 px"
            for r in runs
        )
    )


async def run_config(name, model, config, levels, duration, steps, drain, workdir) -> dict:
    server = Server(model, config, workdir)
    try:
        await server.wait_ready()
        out = {"config": config, "levels": []}
        for clients in levels:
            level = await load_level(server.url, clients, duration, steps, drain)
            print(f"  {name:9s} {clients:3d} clients: {level['images_per_s']:.2f} img/s, "
                  f"p50 {level['latency_s']['p50']}, errors {level['errors']}", flush=True)  # fmt: skip
            out["levels"].append(level)
        return out
    finally:
        server.stop()


async def server_503_seconds(url: str) -> dict[str, float]:
    """Server-side latency of 503 answers: the cumulative fraction under each histogram bucket
    (client-side numbers also hold the client's own scheduling on a shared CPU)."""
    import httpx

    async with httpx.AsyncClient() as c:
        text = (await c.get(url + "/metrics")).text
    prefix = 'difforge_http_request_duration_seconds_bucket{le="'
    buckets = {}
    for line in text.splitlines():
        if line.startswith(prefix) and 'route="/v1/generate"' in line and 'status="503"' in line:
            le = line[len(prefix) :].split('"')[0]
            buckets[le] = float(line.rsplit(" ", 1)[1])
    total = buckets.get("+Inf", 0.0)
    return {f"le_{le}": round(v / total, 4) for le, v in buckets.items() if total}


async def overload(model, config, duration, steps, drain, workdir) -> dict:
    server = Server(model, config, workdir)
    try:
        await server.wait_ready()
        before = rss_kib(server.proc.pid)
        level = await load_level(server.url, 200, duration, steps, drain)
        after = rss_kib(server.proc.pid)
        server_side = await server_503_seconds(server.url)
        accepted_failed = level["unfinished_at_drain_end"] + sum(
            v for k, v in level["statuses"].items() if k not in ("200", "503")
        )
        print(
            f"  overload  200 clients: {level['statuses']}, 503 p99 (client) "
            f"{level['rejected_latency_s']['p99']}, server-side 503s under 10 ms: "
            f"{server_side.get('le_0.01')}, RSS {before['VmRSS']} -> {after['VmRSS']} KiB",
            flush=True,
        )
        return {
            **level,
            "config": config,
            "server_503_latency_cdf": server_side,
            "rss_kib_before": before,
            "rss_kib_after": after,
            "accepted_not_completed": accepted_failed,
        }
    finally:
        server.stop()


async def readiness_timeline(server: Server, timeout: float = 300) -> dict:
    """Poll live and ready every 50 ms from process start until ready: does the service say
    "not ready" while it loads and warms, and how long until each answers?"""
    import httpx

    t0, first_live, not_ready = time.monotonic(), None, 0
    async with httpx.AsyncClient(timeout=5) as c:
        while time.monotonic() - t0 < timeout:
            try:
                live = (await c.get(server.url + "/v2/health/live")).status_code == 200
                ready = (await c.get(server.url + "/v2/health/ready")).status_code == 200
            except httpx.TransportError:
                live = ready = False
            if live and first_live is None:
                first_live = time.monotonic() - t0
            if ready:
                return {"live_after_s": first_live, "ready_after_s": time.monotonic() - t0,
                        "not_ready_answers": not_ready}  # fmt: skip
            not_ready += live
            await asyncio.sleep(0.05)
    raise TimeoutError("restarted server did not become ready")


def verify_audit(db: Path) -> dict:
    """Recompute the hash chain of the audit log at `db` (the server is not running)."""
    from difforge.serving.audit import AuditLog

    log = AuditLog(db)
    try:
        v = log.verify()
    finally:
        log.close()
    return {"ok": v.ok, "rows": v.rows, "reason": v.reason}


async def kill_run(model, config, steps, workdir) -> dict:
    """SIGKILL the server under load (16 clients), restart it on the same audit log: no hang,
    readiness false until warm, and the audit chain still verifies (and keeps growing)."""
    db = workdir / "audit-kill.db"
    first = Server(model, config, workdir, audit_db=db)
    await first.wait_ready()
    load = asyncio.create_task(load_level(first.url, 16, 6.0, steps, 5.0))
    await asyncio.sleep(4.0)
    first.proc.kill()  # SIGKILL: no shutdown handler runs
    first.proc.wait(10)
    first.log.close()
    t_kill = time.monotonic()
    killed_level = await asyncio.wait_for(load, 60)  # the clients must not hang
    clients_back_s = time.monotonic() - t_kill
    before = verify_audit(db)
    second = Server(model, config, workdir, audit_db=db)
    try:
        timeline = await readiness_timeline(second)
        after_level = await load_level(second.url, 4, 3.0, steps, 30.0)
    finally:
        second.stop()
    after = verify_audit(db)
    out = {
        "under_load": {k: killed_level[k] for k in ("images", "statuses", "errors")},
        "clients_returned_after_kill_s": clients_back_s,
        "audit_after_kill": before,
        "restart": timeline,
        "after_restart": {k: after_level[k] for k in ("images", "statuses", "errors")},
        "audit_after_restart": after,
    }
    print(f"  kill      {json.dumps(out)}", flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=60.0, help="seconds per level")
    ap.add_argument("--levels", default="1,4,16,64")
    ap.add_argument("--net", choices=sorted(NETS), default="small")
    ap.add_argument("--model", help="serve this model folder instead of a random --net one")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8, help="max_batch_images with batching on")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the sampler")
    ap.add_argument(
        "--quick", action="store_true", help="3 s per level, levels 1,16: check that it works"
    )
    ap.add_argument(
        "--only-invariance", action="store_true", help="only measure batch (in)variance"
    )
    args = ap.parse_args()
    duration = 3.0 if args.quick else args.duration
    drain = 15.0 if args.quick else max(30.0, args.duration)  # bound on finishing in-flight work
    levels = [1, 16] if args.quick else [int(x) for x in args.levels.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        model = Path(args.model) if args.model else make_model(workdir / "model", args.net)
        measured = (
            []
            if args.quick and not args.only_invariance
            else invariance(model, [1, 2], [1, 2, 3, 4, 5, 6, 7, 8, 16], args.steps)
        )
        if args.only_invariance:
            summary = f"{args.net} net: " + invariance_summary(measured)
            print(
                write_result(
                    f"batch_invariance_{args.net}", {"net": args.net, "rows": measured}, summary
                )
            )
            return 0
        base = {
            "queue_size": 256,
            "batch_wait_ms": 10,
            "limits": {"max_steps": max(args.steps, 100)},
        }
        if args.threads:
            base["torch_threads"] = args.threads
        configs = {
            "batched": {**base, "limits": {**base["limits"], "max_batch_images": args.batch}},
            "unbatched": {**base, "limits": {**base["limits"], "max_batch_images": 1}},
        }
        results = {}
        for name, cfg in configs.items():
            results[name] = asyncio.run(
                run_config(name, model, cfg, levels, duration, args.steps, drain, workdir)
            )
        results["offline"] = offline(model, args.batch, args.steps, duration, args.threads)
        print(f"  offline   {results['offline']['images_per_s']:.2f} img/s", flush=True)
        results["in_process_lone"] = in_process_lone(model, args.steps, duration, args.threads)
        print(f"  in-process lone p50 {results['in_process_lone']['p50']:.3f} s", flush=True)
        small_queue = {**configs["batched"], "queue_size": 8}
        results["overload"] = asyncio.run(
            overload(model, small_queue, duration, args.steps, drain, workdir)
        )
        results["kill"] = asyncio.run(kill_run(model, configs["batched"], args.steps, workdir))
    top = {n: max(lv["images_per_s"] for lv in results[n]["levels"]) for n in configs}
    ov, kill = results["overload"], results["kill"]
    ref = results["in_process_lone"]["p50"]
    lone = {n: next((lv["latency_s"]["p50"] for lv in results[n]["levels"] if lv["clients"] == 1),
                    None) for n in configs}  # fmt: skip
    lone_text = ", ".join(
        f"{n} {v:.3f} s = {v / ref:.2f}x" for n, v in lone.items() if v is not None
    )
    summary = (
        f"{args.model or args.net + ' net'}, {args.steps} steps, guided, {duration:g} s/level: batched "
        f"{top['batched']:.2f} img/s, unbatched {top['unbatched']:.2f}, offline "
        f"{results['offline']['images_per_s']:.2f}; lone client p50 vs in-process {ref:.3f} s: "
        f"{lone_text or 'level 1 not run'}; overload: 503 p99 "
        f"{ov['rejected_latency_s']['p99'] or 0:.3f} s (client), "
        f"{ov['server_503_latency_cdf'].get('le_0.01', 0):.0%} under 10 ms (server), "
        f"accepted-not-completed {ov['accepted_not_completed']}, RSS "
        f"{ov['rss_kib_before']['VmRSS'] // 1024}->{ov['rss_kib_after']['VmRSS'] // 1024} MiB"
        f"; kill: clients back {kill['clients_returned_after_kill_s']:.2f} s after SIGKILL, "
        f"restart not-ready x{kill['restart']['not_ready_answers']} then ready at "
        f"{kill['restart']['ready_after_s']:.1f} s, audit chain "
        f"{'verifies' if kill['audit_after_restart']['ok'] else 'BROKEN'} "
        f"({kill['audit_after_kill']['rows']} -> {kill['audit_after_restart']['rows']} rows)"
    )
    name = "serve_load_quick" if args.quick else "serve_load"
    payload = {"net": args.model or args.net, "steps": args.steps, "duration_s": duration, "levels": levels,
               "invariance": measured, "results": results}  # fmt: skip
    print(write_result(name, payload, summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
