"""The exact result cache: identical resolved requests are answered from stored pixels, byte for
byte, without a sampler call; tenants never share entries; LRU by bytes; TTL; off by default."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import torch

from difforge.serving import ApiKey, ServiceConfig, hash_key
from difforge.serving.cache import CachedResult, ResultCache, result_key
from difforge.serving.config import ResultCacheConfig
from tests.integration.serving_fixtures import make_service, run, running, wrap_denoisers

FAST = {"torch_threads": 1, "warmup_steps": 1, "batch_wait_ms": 0}
ON = ResultCacheConfig(max_bytes=1 << 20)
BODY = {"labels": [3], "seed": 7, "guidance": 2.5}


class Counting:
    """Counts the forwards of a denoiser (one per batched network evaluation)."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, cond=None):
        self.calls += 1
        return self.denoiser(x, sigma, cond)


def _counting(svc) -> list[Counting]:
    wrapped: list[Counting] = []
    wrap_denoisers(svc, lambda d: wrapped.append(Counting(d)) or wrapped[-1])
    return wrapped


class _FrozenTime(datetime):
    @classmethod
    def now(cls, tz=None):
        return datetime(2026, 1, 1, tzinfo=UTC)


def _value(svc, name: str) -> float:
    return svc.metrics.registry.get_sample_value(name) or 0.0


@pytest.mark.parametrize(
    "body", [BODY, {"labels": [1, 2], "seeds": [5, 9], "response_format": "json"}]
)
def test_a_hit_is_byte_identical_and_runs_no_sampler_call(model_dir, monkeypatch, body):
    # the response carries its request id and creation time: fix both to compare bytes
    monkeypatch.setattr("difforge.serving.service.datetime", _FrozenTime)
    headers = {"x-request-id": "cache-test-0001"}

    async def scenario():
        svc = make_service(model_dir, **FAST, result_cache=ON)
        async with running(svc) as c:
            counted = _counting(svc)
            first = await c.post("/v1/generate", json=body, headers=headers)
            calls = counted[0].calls
            second = await c.post("/v1/generate", json=body, headers=headers)
            assert first.status_code == second.status_code == 200
            assert (first.headers["x-cache"], second.headers["x-cache"]) == ("miss", "hit")
            assert first.content == second.content
            assert first.headers["x-output-sha256"] == second.headers["x-output-sha256"]
            assert calls > 0 and counted[0].calls == calls  # the hit sampled nothing
            assert _value(svc, "difforge_result_cache_hits_total") == 1
            assert _value(svc, "difforge_result_cache_misses_total") == 1
            record = svc.audit.get("cache-test-0001")  # the newest row: the hit
            assert record["status"] == "ok" and record["detail"]["cache"] == "hit"
            assert record["output_sha256"] == second.headers["x-output-sha256"]
            assert svc.audit.verify().ok
        fresh = make_service(model_dir, **FAST)  # cache off: the same bytes, computed
        async with running(fresh) as c:
            r = await c.post("/v1/generate", json=body, headers=headers)
            assert r.content == second.content and "x-cache" not in r.headers

    run(scenario())


def test_off_by_default_and_drawn_seeds_never_hit(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        assert not svc.cache.enabled and ServiceConfig().result_cache.max_bytes == 0
        async with running(svc) as c:
            for _ in range(2):
                r = await c.post("/v1/generate", json=BODY)
                assert r.status_code == 200 and "x-cache" not in r.headers
            assert len(svc.cache) == 0
        svc = make_service(model_dir, **FAST, result_cache=ON)
        async with running(svc) as c:
            for _ in range(2):
                r = await c.post("/v1/generate", json={"labels": [3]})  # seed drawn
                assert r.status_code == 200 and "x-cache" not in r.headers
            assert len(svc.cache) == 0 and _value(svc, "difforge_result_cache_misses_total") == 0

    run(scenario())


def test_a_version_without_batch_invariance_is_not_cached(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST, result_cache=ON, batch_invariance="off")
        async with running(svc) as c:
            for _ in range(2):
                r = await c.post("/v1/generate", json=BODY)
                assert r.status_code == 200 and "x-cache" not in r.headers
            assert len(svc.cache) == 0

    run(scenario())


def test_tenants_do_not_share_entries(model_dir):
    keys = tuple(ApiKey(id=t, sha256=hash_key(f"{t}-secret-key")) for t in ("alice", "bob"))
    auth = {t: {"Authorization": f"Bearer {t}-secret-key"} for t in ("alice", "bob")}

    async def scenario():
        svc = make_service(model_dir, **FAST, result_cache=ON, api_keys=keys)
        async with running(svc) as c:
            a1 = await c.post("/v1/generate", json=BODY, headers=auth["alice"])
            b1 = await c.post("/v1/generate", json=BODY, headers=auth["bob"])
            a2 = await c.post("/v1/generate", json=BODY, headers=auth["alice"])
            got = [r.headers["x-cache"] for r in (a1, b1, a2)]
            assert got == ["miss", "miss", "hit"] and len(svc.cache) == 2
            assert a1.headers["x-output-sha256"] == b1.headers["x-output-sha256"]
        shared = ResultCacheConfig(max_bytes=1 << 20, per_tenant=False)
        svc = make_service(model_dir, **FAST, result_cache=shared, api_keys=keys)
        async with running(svc) as c:
            await c.post("/v1/generate", json=BODY, headers=auth["alice"])
            r = await c.post("/v1/generate", json=BODY, headers=auth["bob"])
            assert r.headers["x-cache"] == "hit"

    run(scenario())


def test_lru_eviction_by_bytes_in_the_service(model_dir):
    async def scenario():
        # one 8x8 grey image is 64 bytes: room for two
        svc = make_service(model_dir, **FAST, result_cache=ResultCacheConfig(max_bytes=128))
        async with running(svc) as c:

            async def cache_of(seed):
                r = await c.post("/v1/generate", json={**BODY, "seed": seed})
                return r.headers["x-cache"]

            assert [await cache_of(s) for s in (1, 2, 1, 3)] == ["miss", "miss", "hit", "miss"]
            assert svc.cache.nbytes == 128  # 2 was least recently used: gone, 1 stays
            assert [await cache_of(s) for s in (1, 2)] == ["hit", "miss"]
            evicted = 'difforge_result_cache_evictions_total{reason="bytes"}'
            assert evicted.encode() + b" 2.0" in svc.metrics.exposition()

    run(scenario())


def test_ttl_expiry_with_an_injected_clock(model_dir):
    now = [0.0]

    async def scenario():
        svc = make_service(model_dir, **FAST, result_cache=ON)
        svc.cache = ResultCache(1 << 20, ttl_s=10.0, clock=lambda: now[0])
        async with running(svc) as c:
            got = []
            for t in (0.0, 9.0, 10.0, 15.0):
                now[0] = t
                got.append((await c.post("/v1/generate", json=BODY)).headers["x-cache"])
            assert got == ["miss", "hit", "miss", "hit"]  # stored again at t=10

    run(scenario())


def _result(n: int) -> CachedResult:
    return CachedResult(tuple(torch.zeros(1, 4, 4, dtype=torch.uint8) for _ in range(n)), 4, (n,))


def test_result_cache_lru_ttl_and_limits():
    now, evicted = [0.0], []
    cache = ResultCache(64, ttl_s=5.0, clock=lambda: now[0], on_evict=evicted.append)
    a, b, c = (result_key("t", "v1", {"seeds": [s]}) for s in (1, 2, 3))
    assert a != result_key("u", "v1", {"seeds": [1]}) != result_key("t", "v2", {"seeds": [1]})
    cache.put(a, _result(2))  # 32 bytes
    cache.put(b, _result(2))
    assert cache.get(a) is not None  # a is now the most recently used
    cache.put(c, _result(2))
    assert cache.get(b) is None and cache.get(a) is not None and evicted == ["bytes"]
    cache.put(a, _result(5))  # larger than the cache: not kept, the old entry stays
    assert cache.nbytes == 64
    now[0] = 5.0
    assert cache.get(a) is None and cache.get(c) is None and evicted == ["bytes", "ttl", "ttl"]
    assert len(cache) == 0 and cache.nbytes == 0
    off = ResultCache(0)
    off.put(a, _result(1))
    assert not off.enabled and off.get(a) is None


def test_the_key_names_the_adapter_weights_and_the_version(model_dir):
    from dataclasses import replace

    from difforge.serving.access import Principal
    from difforge.serving.batching import BatchPlan
    from difforge.serving.service import GenerateCall

    class Stub:
        def __init__(self, sha):
            self.sha = sha

        def describe(self):
            return {"name": "x", "sha256": self.sha, "scale": 1.0}

    svc = make_service(model_dir, result_cache=ON)
    version = svc.router.production
    version.plan = BatchPlan("pad", 8)
    plan = svc._plan(GenerateCall(Principal("t", frozenset(), False), b'{"seed": 1}'), "r" * 8)
    call = GenerateCall(Principal("t", frozenset(), False), b"")
    base = svc._cache_key(call, version, plan)
    adapted = replace(plan, adapter="x")
    version.model.adapters["x"] = Stub("a" * 64)
    first = svc._cache_key(call, version, adapted)
    version.model.adapters["x"] = Stub("b" * 64)  # attached again under its name, new weights
    assert len({base, first, svc._cache_key(call, version, adapted)}) == 3
    version.plan = BatchPlan("off", 8)
    assert svc._cache_key(call, version, plan) is None
