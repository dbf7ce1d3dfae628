"""Idempotency-Key records and rate limits shared by replicas through a database
(difforge.serving.shared_state): SQLite always, the real PostgreSQL when DIFFORGE_TEST_POSTGRES_URL
is set (each test in its own schema, dropped afterwards)."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid

import pytest
from sqlalchemy import func, select, text

from difforge.core.errors import InvalidArgumentError
from difforge.registry import Registry
from difforge.registry.schema import audit_log, read_transaction
from difforge.serving import RateLimit, ServiceConfig
from difforge.serving.access import RateLimiter
from difforge.serving.config import RegistryFollow, StateConfig
from difforge.serving.idempotency import IdempotencyConflict, StoredResponse
from difforge.serving.registry_notify import libpq_url, notifies
from difforge.serving.registry_source import open_service, registry_version
from difforge.serving.shared_state import (
    DatabaseIdempotency,
    DatabaseRateLimiter,
    open_state_engine,
    state_url,
)
from tests.integration.serving_fixtures import (
    make_service,
    make_tiny_model,
    run,
    running,
    slow_down,
    until,
)
from tests.integration.test_registry import registry_url  # noqa: F401 (fixture: sqlite, postgresql)

FAST = {"torch_threads": 1, "warmup_steps": 1}
REPORT = {"num_samples": 100, "metrics": {"fid": 10.0, "memorization": 0.0}}
BODY = b'{"labels": [4], "seed": 11}'


class Clock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def engines(registry_url):  # noqa: F811
    """Two engines on one database: two replicas' view of the shared state."""
    made = [open_state_engine(registry_url), open_state_engine(registry_url)]
    yield made
    for e in made:
        e.dispose()


def test_claims_replay_conflict_mismatch_and_takeover_across_stores(engines):
    clock = Clock()
    a, b = (DatabaseIdempotency(e, lease_s=30, ttl_s=600, clock=clock) for e in engines)
    assert a.claim("alice", "k1", BODY) is None
    with pytest.raises(IdempotencyConflict) as e:
        b.claim("alice", "k1", BODY)  # still running on a
    assert e.value.reason == "idempotency_conflict"
    with pytest.raises(IdempotencyConflict) as e:
        b.claim("alice", "k1", b'{"labels": [4], "seed": 12}')
    assert e.value.reason == "idempotency_mismatch"
    assert b.claim("bob", "k1", BODY) is None  # keys are per API key id
    png = bytes(range(256)) * 3
    a.complete("alice", "k1", StoredResponse(png, "image/png", {"X-Request-Id": "r1"}))
    # key order and spacing do not matter; the stored bytes come back exactly
    replay = b.claim("alice", "k1", b'{"seed":11,"labels":[4]}')
    assert replay == StoredResponse(png, "image/png", {"X-Request-Id": "r1"})

    # a replica dies mid-request: its claim lapses after the lease, and a retry takes over
    assert a.claim("alice", "k2", BODY) is None
    clock.t += 20
    assert a.renew("alice", "k2")  # renewed while it runs: not abandoned yet
    clock.t += 20
    with pytest.raises(IdempotencyConflict):
        b.claim("alice", "k2", BODY)
    clock.t += 31
    assert b.claim("alice", "k2", BODY) is None  # taken over
    assert not a.renew("alice", "k2")
    a.complete("alice", "k2", StoredResponse(b"late", "image/png"))  # not ours: ignored
    a.release("alice", "k2")  # nor deleted
    b.complete("alice", "k2", StoredResponse(b"fresh", "image/png"))
    assert a.claim("alice", "k2", BODY).body == b"fresh"
    # a held-for-review answer (202) replays as a 202
    assert a.claim("alice", "k3", BODY) is None
    a.complete("alice", "k3", StoredResponse(b"{}", "application/json", {}, 202))
    assert b.claim("alice", "k3", BODY) == StoredResponse(b"{}", "application/json", {}, 202)

    # expiry: a done record is forgotten after ttl_s, a failed claim at once
    clock.t += 601
    assert b.claim("alice", "k1", BODY) is None
    b.release("alice", "k1")
    assert a.claim("alice", "k1", BODY) is None


def test_stored_responses_are_bounded_in_number_and_size(engines):
    clock = Clock()
    a = DatabaseIdempotency(engines[0], max_entries=2, max_response_bytes=100, clock=clock)
    b = DatabaseIdempotency(engines[1], max_entries=2, max_response_bytes=100, clock=clock)
    for i, store in enumerate([a, b, a]):
        clock.t += 1
        assert store.claim("k", f"n{i}", BODY) is None
        store.complete("k", f"n{i}", StoredResponse(b"x%d" % i, "image/png"))
    assert a.claim("k", "n0", BODY) is None  # the oldest was pruned: computed again
    assert b.claim("k", "n2", BODY).body == b"x2"
    assert a.claim("big", "k", BODY) is None
    a.complete("big", "k", StoredResponse(b"y" * 101, "image/png"))  # answered, not stored
    assert b.claim("big", "k", BODY) is None


def test_a_rate_limit_is_one_bucket_across_replicas(engines):
    config = ServiceConfig(rate_limit=RateLimit(per_second=2.0, burst=3))
    clock = Clock()
    a, b = (DatabaseRateLimiter(config, e, clock=clock) for e in engines)
    memory = RateLimiter(config, clock=clock)
    answers, expected = [], []
    for i, dt in enumerate([0, 0, 0, 0, 0.25, 0.25, 0.0, 2.0, 0, 0, 0, 0]):
        clock.t += dt
        answers.append(((a, b)[i % 2]).acquire("alice"))
        expected.append(memory.acquire("alice"))
    # the shared bucket answers exactly what one replica's in-memory bucket does
    assert answers == pytest.approx(expected)
    assert [w is None for w in answers[:4]] == [True, True, True, False]
    assert answers[3] == pytest.approx(0.5)
    a.refund("alice")
    memory.refund("alice")
    assert b.acquire("alice") is None and memory.acquire("alice") is None
    assert b.acquire("bob") is None  # another key, another bucket
    clock.t -= 100  # a replica whose clock is behind: no refill runs backwards
    assert b.acquire("bob") is None and b.acquire("bob") is None
    assert b.acquire("bob") is not None


def test_concurrent_replicas_grant_exactly_the_burst(engines):
    config = ServiceConfig(rate_limit=RateLimit(per_second=1e-6, burst=10))
    limiters = [DatabaseRateLimiter(config, e) for e in engines]
    granted, barrier = [], threading.Barrier(8)

    def hammer(i: int) -> None:
        barrier.wait()
        for _ in range(5):
            granted.append(limiters[i % 2].acquire("shared") is None)

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(granted) == 40 and sum(granted) == 10


def test_the_state_url_follows_the_config_and_registry(tmp_path):
    pg = "postgresql+psycopg://u@h/db"
    sq = f"sqlite:///{tmp_path}/r.db"
    assert state_url(ServiceConfig()) is None
    assert state_url(ServiceConfig(), sq) is None  # auto: a SQLite registry stays in memory
    assert state_url(ServiceConfig(), pg) == pg
    assert state_url(ServiceConfig(state=StateConfig(backend="memory")), pg) is None
    assert state_url(ServiceConfig(state=StateConfig(backend="database")), sq) == sq
    assert state_url(ServiceConfig(state=StateConfig(url=sq))) == sq
    with pytest.raises(InvalidArgumentError, match=r"needs state\.url"):
        state_url(ServiceConfig(state=StateConfig(backend="database")))
    with pytest.raises(InvalidArgumentError, match="PostgreSQL or SQLite"):
        open_state_engine("mysql://u@h/db")
    with pytest.raises(ValueError, match="memory"):
        StateConfig(backend="redis")


def test_two_replicas_share_idempotency_and_rate_limits_over_http(model_dir, registry_url):  # noqa: F811
    state = StateConfig(backend="database", url=registry_url)

    async def scenario():
        one = make_service(model_dir, ServiceConfig(audit_db=":memory:", state=state, **FAST))
        two = make_service(model_dir, ServiceConfig(audit_db=":memory:", state=state, **FAST))
        assert one.state.backend == two.state.backend == "database"
        async with running(one) as a, running(two) as b:
            body = {"labels": [4], "seed": 11, "steps": 2}
            first = await a.post("/v1/generate", json=body, headers={"Idempotency-Key": "k"})
            assert first.status_code == 200
            again = await b.post("/v1/generate", json=body, headers={"Idempotency-Key": "k"})
            assert again.status_code == 200 and again.content == first.content
            assert again.headers["idempotent-replayed"] == "true"
            assert again.headers["x-request-id"] == first.headers["x-request-id"]
            made = two.metrics.images.labels(two.router.production.id, "dpmpp_2m")._value.get()
            assert made == 0  # the replay cost two no sampler call
            assert one.metrics.images.labels(one.router.production.id, "dpmpp_2m")._value.get()
            other = await b.post(
                "/v1/generate", json={**body, "seed": 12}, headers={"Idempotency-Key": "k"}
            )
            assert other.status_code == 422
            # in flight on one: the other answers 409 with Retry-After, then the stored answer
            slow_down(one, 0.025)
            slow = {"labels": [1], "steps": 40, "sampler": "euler"}
            task = asyncio.create_task(
                a.post("/v1/generate", json=slow, headers={"Idempotency-Key": "s"})
            )
            await until(lambda: bool(one.engine.jobs))
            dup = await b.post("/v1/generate", json=slow, headers={"Idempotency-Key": "s"})
            assert dup.status_code == 409 and int(dup.headers["retry-after"]) >= 1
            done = await task
            replay = await b.post("/v1/generate", json=slow, headers={"Idempotency-Key": "s"})
            assert done.status_code == replay.status_code == 200
            assert replay.content == done.content

    run(scenario())


def test_a_rate_limit_counts_requests_on_both_replicas(model_dir, registry_url):  # noqa: F811
    limited = ServiceConfig(
        audit_db=":memory:",
        state=StateConfig(url=registry_url),
        rate_limit=RateLimit(per_second=0.001, burst=3),
        **FAST,
    )

    async def scenario():
        one, two = make_service(model_dir, limited), make_service(model_dir, limited)
        async with running(one) as a, running(two) as b:
            body = {"labels": [2], "seed": 1, "steps": 1}
            codes = [(await c.post("/v1/generate", json=body)).status_code for c in (a, b, a)]
            assert codes == [200, 200, 200]
            refused = await b.post("/v1/generate", json=body)  # b itself served one only
            assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1

    run(scenario())


def test_libpq_url_keeps_the_options():
    url = "postgresql+psycopg://u:p@h:5433/db?options=-csearch_path%3Ds1"
    assert libpq_url(url) == "postgresql://u:p@h:5433/db?options=-csearch_path%3Ds1"
    assert notifies(url) and not notifies("sqlite:///r.db") and not notifies("::bad::")


@pytest.mark.parametrize("registry_url", ["postgresql"], indirect=True)  # SQLite has no NOTIFY
def test_a_postgresql_registry_change_reaches_every_replica_at_once(registry_url, tmp_path):  # noqa: F811
    assert notifies(registry_url)
    name = f"tiny{uuid.uuid4().hex[:8]}"  # its listeners are told apart by this name
    artifacts = tmp_path / "artifacts"
    reg = Registry(registry_url, artifacts, actor="test")
    for i in (1, 2):
        folder = make_tiny_model(tmp_path / f"v{i}", seed=i, name="tiny")
        reg.register(folder, name, reports=[REPORT])
    reg.promote(name, 1, to="production", gates={"smoke_sample": False})
    # polling effectively off: only a notification can move the replicas within the test
    follow = RegistryFollow(poll_s=3600, check_s=3600, auto_rollback=False)
    config = ServiceConfig(audit_db=":memory:", registry=follow, **FAST)
    activity = "FROM pg_stat_activity WHERE application_name = :a"

    def listeners(kill: bool = False) -> int:
        what = "count(pg_terminate_backend(pid))" if kill else "count(*)"
        with reg.engine.connect() as conn:
            return conn.execute(
                text(f"SELECT {what} {activity}"), {"a": f"difforge-listen:{name}"}
            ).scalar()

    async def scenario():
        async with contextlib.AsyncExitStack() as stack:
            sources = []
            for _ in range(2):
                service, source = open_service(registry_url, name, config, artifacts)
                await stack.enter_async_context(running(service, source=source))
                sources.append(source)
            assert all(s.service.state.backend == "database" for s in sources)  # auto
            status = sources[0].status()
            assert status["follow"] == {"poll_s": 3600, "notify": True}
            assert status["shared_state"] == "database"
            served = lambda v: all(  # noqa: E731
                registry_version(s.service.router.production) == v for s in sources
            )
            await until(lambda: listeners() == 2, timeout=10)
            await asyncio.to_thread(reg.promote, name, 2, gates={"smoke_sample": False})
            await until(lambda: served(2), timeout=30)
            await asyncio.to_thread(reg.rollback, name)
            await until(lambda: served(1), timeout=10)
            # the server drops the listening connections: each reconnects and hears again
            assert listeners(kill=True) == 2
            await until(lambda: listeners() == 2, timeout=15, poll_s=0.2)
            await asyncio.to_thread(reg.promote, name, 2, gates={"smoke_sample": False})
            await until(lambda: served(2), timeout=10)

    try:
        run(scenario())
    finally:
        reg.close()


def test_a_registry_read_is_one_snapshot(registry_url, tmp_path):  # noqa: F811
    """A follower's resolve must not mix states from before and after a commit (it did on
    PostgreSQL at READ COMMITTED: benchmarks/promotion_bound.py caught a replica that recorded a
    promotion's revision while still serving the old version)."""
    reg = Registry(registry_url, tmp_path / "artifacts", actor="test")
    folders = [make_tiny_model(tmp_path / f"v{i}", seed=i, name="tiny") for i in (1, 2)]
    reg.register(folders[0], "tiny", reports=[REPORT])
    count = select(func.count()).select_from(audit_log)
    try:
        with read_transaction(reg.engine) as conn:
            before = conn.execute(count).scalar()
            reg.register(folders[1], "tiny", reports=[REPORT])  # commits on another connection
            assert conn.execute(count).scalar() == before
        with read_transaction(reg.engine) as conn:
            assert conn.execute(count).scalar() > before
    finally:
        reg.close()


def test_a_lost_state_database_is_a_503_not_a_crash(model_dir, tmp_path):
    url = f"sqlite:///{tmp_path}/state.db"
    config = ServiceConfig(
        audit_db=":memory:", state=StateConfig(url=url), rate_limit=RateLimit(per_second=9, burst=9),
        **FAST,
    )  # fmt: skip

    async def scenario():
        svc = make_service(model_dir, config)
        async with running(svc) as c:
            body = {"labels": [2], "seed": 1, "steps": 1}
            assert (await c.post("/v1/generate", json=body)).status_code == 200
            with svc.state.engine.begin() as conn:  # the database loses its tables
                conn.exec_driver_sql("DROP TABLE serving_rate_buckets")
                conn.exec_driver_sql("DROP TABLE serving_idempotency")
            r = await c.post("/v1/generate", json=body, headers={"Idempotency-Key": "k"})
            assert r.status_code == 503 and r.headers["retry-after"] == "1"
            assert r.json()["detail"] == "the shared state database is unavailable; retry shortly"

    run(scenario())
