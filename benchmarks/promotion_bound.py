"""How long after a registry promotion or rollback every replica serves the new version.

    python -m benchmarks.promotion_bound [--postgres URL] [--replicas 2] [--poll-s 0.25,1,2]
                                         [--cycles 3] [--notify]

The registry is a fresh SQLite file, or (--postgres) a fresh schema on that PostgreSQL server,
dropped afterwards.

N services follow one registry (each with its own Registry object and database connections, as N
`difforge serve --registry` processes would; here in one process to spare the shared CPU).
Each cycle registers a fresh version of a tiny 8x8 U-Net, promotes it to production (what
`difforge registry promote` calls), waits until every replica's router serves it, then rolls
back (`difforge registry rollback`) and waits again. Times run from the moment the registry call
returns (the change is committed) to the moment each replica's router has swapped; one generate
request per replica afterwards checks that HTTP answers come from the new version.

A promotion of a new version costs a replica: the wait for its next poll (uniform in [0, poll_s])
or the notification (--notify, PostgreSQL), then load + sha256 verification + warm-up. A rollback
to the version just replaced reuses the warm copy each replica kept (`keep_previous`), so only
the wait remains.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
import uuid
from pathlib import Path

from benchmarks.common import write_result
from difforge.registry import Registry
from difforge.serving import ServiceConfig
from difforge.serving.config import RegistryFollow
from difforge.serving.registry_source import open_service, registry_version
from tests.integration.serving_fixtures import make_tiny_model, running

NAME = "bound"
REPORT = {"num_samples": 100, "metrics": {"fid": 10.0, "memorization": 0.0}}
GATES = {"smoke_sample": False}  # gates are not what is measured; the registry call returns first


async def _until_all(sources, version: int, t0: float, timeout: float = 120.0) -> list[float]:
    """Seconds from t0 until each replica's production is registry `version`."""
    seen: dict[int, float] = {}
    while len(seen) < len(sources):
        for i, source in enumerate(sources):
            if i not in seen and registry_version(source.service.router.production) == version:
                seen[i] = time.perf_counter() - t0
        if time.perf_counter() - t0 > timeout:
            status = [s.status() for s in sources]
            raise TimeoutError(
                f"v{version} not served by every replica after {timeout} s: {status}"
            )
        await asyncio.sleep(0.002)
    return [seen[i] for i in range(len(sources))]


async def _check_http(clients, sources) -> None:
    for client, source in zip(clients, sources, strict=True):
        r = await client.post("/v1/generate", json={"labels": [1], "steps": 1, "guidance": 1.0})
        assert r.status_code == 200, r.text
        assert r.headers["x-model-version"] == source.service.router.production.id


async def _measure(url, artifacts, models, replicas, poll_s, cycles, notify, first) -> dict:
    follow = RegistryFollow(poll_s=poll_s, check_s=3600, auto_rollback=False, notify=notify)
    config = ServiceConfig(
        audit_db=":memory:", registry=follow, torch_threads=1, warmup_steps=1,
        state={"backend": "memory"},
    )  # fmt: skip
    reg = Registry(url, artifacts, actor="benchmark")
    promote, rollback = [], []
    async with contextlib.AsyncExitStack() as stack:
        sources, clients = [], []
        for _ in range(replicas):
            service, source = open_service(url, NAME, config, artifacts)
            clients.append(await stack.enter_async_context(running(service, source=source)))
            sources.append(source)
        base = registry_version(sources[0].service.router.production)
        for c in range(cycles):
            number = (
                await asyncio.to_thread(reg.register, models[first + c], NAME, reports=[REPORT])
            ).version
            await asyncio.to_thread(reg.promote, NAME, number, to="production", gates=GATES)
            promote.append(await _until_all(sources, number, time.perf_counter()))
            await _check_http(clients, sources)
            await asyncio.to_thread(reg.rollback, NAME)
            rollback.append(await _until_all(sources, base, time.perf_counter()))
            await _check_http(clients, sources)
    reg.close()
    return {"poll_s": poll_s, "notify": notify, "promote_s": promote, "rollback_s": rollback}


def _stats(rows: list[list[float]]) -> dict:
    every = [max(r) for r in rows]  # the last replica to swap decides "every replica"
    flat = [x for r in rows for x in r]
    return {
        "n_changes": len(rows),
        "n_replica_swaps": len(flat),
        "every_replica_max_s": round(max(every), 3),
        "every_replica_median_s": round(statistics.median(every), 3),
        "replica_mean_s": round(statistics.fmean(flat), 3),
    }


@contextlib.contextmanager
def _database(postgres: str | None, tmp: Path):
    """A fresh registry URL: a SQLite file in `tmp`, or a new schema on `postgres`."""
    if postgres is None:
        yield f"sqlite:///{tmp}/registry.db"
        return
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    schema = f"difforge_bench_{uuid.uuid4().hex[:12]}"
    admin = create_engine(postgres)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        url = make_url(postgres).update_query_dict({"options": f"-csearch_path={schema}"})
        yield url.render_as_string(hide_password=False)
    finally:
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--postgres", help="a PostgreSQL URL: use a fresh schema there (not SQLite)")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--poll-s", default="0.25,1,2", help="comma-separated poll intervals")
    p.add_argument("--cycles", type=int, default=3, help="promote+rollback pairs per setting")
    p.add_argument("--notify", action="store_true", help="also measure LISTEN/NOTIFY (PostgreSQL)")
    p.add_argument("--name", default="promotion_bound")
    args = p.parse_args(argv)
    polls = [float(x) for x in args.poll_s.split(",")]
    # LISTEN/NOTIFY at the default poll_s (5 s): the notification, not the poll, moves it
    notify = [(RegistryFollow().poll_s, True)] if args.notify else []
    settings = [(s, False) for s in polls] + notify
    with tempfile.TemporaryDirectory() as tmp, _database(args.postgres, Path(tmp)) as url:
        root = Path(tmp)
        total = 1 + len(settings) * args.cycles
        models = [make_tiny_model(root / f"m{i}", seed=i, name=NAME) for i in range(total)]
        reg = Registry(url, root / "artifacts", actor="benchmark")
        reg.register(models[0], NAME, reports=[REPORT])
        reg.promote(NAME, 1, to="production", gates=GATES)
        reg.close()
        results = []
        for i, (poll_s, notify) in enumerate(settings):
            first = 1 + i * args.cycles
            results.append(
                asyncio.run(
                    _measure(url, root / "artifacts", models, args.replicas, poll_s,
                             args.cycles, notify, first)
                )
            )  # fmt: skip
    for r in results:
        r["promote"], r["rollback"] = _stats(r["promote_s"]), _stats(r["rollback_s"])
    backend = url.split(":", 1)[0].split("+")[0]
    payload = {"registry": backend, "replicas": args.replicas, "cycles": args.cycles,
               "results": results}  # fmt: skip
    parts = []
    for r in results:
        how = "LISTEN/NOTIFY" if r["notify"] else "polling"
        parts.append(
            f"poll_s {r['poll_s']:g} {how}: promote (load+warm) every replica max "
            f"{r['promote']['every_replica_max_s']:.2f} s (median "
            f"{r['promote']['every_replica_median_s']:.2f}), rollback (warm spare) max "
            f"{r['rollback']['every_replica_max_s']:.2f} s (median "
            f"{r['rollback']['every_replica_median_s']:.2f})"
        )
    summary = (
        f"{backend} registry, {args.replicas} replicas in one process, tiny 8x8 U-Net, "
        f"n={args.cycles} promotions + {args.cycles} rollbacks per setting; " + "; ".join(parts)
    )
    write_result(args.name, payload, summary)
    print(summary)


if __name__ == "__main__":
    main()
