"""Access, back-pressure and request control through HTTP: keys and scopes, loopback-only mode,
rate limits, a full queue, Idempotency-Key, deadlines, disconnects, canary routing and swaps."""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

from difforge.model import load
from difforge.serving import ApiKey, RateLimit, ServiceConfig, create_app, hash_key
from tests.integration.serving_fixtures import (
    make_service,
    make_tiny_model,
    run,
    running,
    slow_down,
    until,
)

FAST = {"torch_threads": 1, "warmup_steps": 1}
GEN_KEY, ADMIN_KEY, OTHER_KEY = "gen-secret-1f2e", "admin-secret-9a8b", "other-secret-77aa"
SLOW = {"labels": [1], "steps": 40, "sampler": "euler"}  # >= 1 s under slow_down(svc, DELAY)
DELAY = 0.025


@pytest.fixture(scope="module")
def model_dir_b(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("serving") / "tiny-b", seed=1, name="tiny-b")


def keyed_config(**overrides) -> ServiceConfig:
    keys = [
        ApiKey(id="gen", sha256=hash_key(GEN_KEY), scopes=("generate",)),
        ApiKey(id="ops", sha256=hash_key(ADMIN_KEY), scopes=("admin",)),
        ApiKey(id="other", sha256=hash_key(OTHER_KEY), scopes=("generate",)),
    ]
    return ServiceConfig(audit_db=":memory:", api_keys=keys, **FAST, **overrides)


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def running_job(svc):
    jobs = list(svc.engine.jobs.values())
    return jobs[0] if jobs and jobs[0].step > 0 else None


def test_keys_and_scopes(model_dir, caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario():
        svc = make_service(model_dir, keyed_config())
        async with running(svc, client_host="10.0.0.7") as c:
            body = {"labels": [1], "seed": 3}
            for headers in ({}, auth("wrong-key")):
                r = await c.post("/v1/generate", json=body, headers=headers)
                assert r.status_code == 401 and r.json() == {"detail": "unauthorized"}
            r = await c.post("/v1/generate", json=body, headers=auth(ADMIN_KEY))
            assert r.status_code == 403
            r = await c.post("/v1/generate", json=body, headers=auth(GEN_KEY))
            assert r.status_code == 200
            assert (await c.get("/metrics")).status_code == 401
            assert (await c.get("/metrics", headers=auth(GEN_KEY))).status_code == 403
            metrics = await c.get("/metrics", headers={"X-API-Key": ADMIN_KEY})
            assert metrics.status_code == 200
            rid = r.headers["x-request-id"]
            record = (await c.get(f"/v1/requests/{rid}", headers=auth(GEN_KEY))).json()["record"]
            assert record["key_id"] == "gen"
            assert (await c.get(f"/v1/requests/{rid}", headers=auth(OTHER_KEY))).status_code == 404
            assert (await c.get(f"/v1/requests/{rid}", headers=auth(ADMIN_KEY))).status_code == 200
            assert (await c.get("/v2/health/live")).status_code == 200  # health needs no key
            rows = svc.audit._db.execute("SELECT * FROM audit").fetchall()
            return metrics.text, [json.dumps(dict(row)) for row in rows]

    metrics_text, audit_rows = run(scenario())
    for secret in (GEN_KEY, ADMIN_KEY, OTHER_KEY, hash_key(GEN_KEY)):
        assert secret not in metrics_text
        assert not any(secret in row for row in audit_rows)
        assert secret not in caplog.text
    assert 'difforge_errors_total{reason="unauthorized",role="none"} 3.0' in metrics_text


def test_loopback_only_without_keys(model_dir, caplog):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        app = create_app(svc)
        async with app.router.lifespan_context(app):
            await svc.wait_ready()
            remote = httpx.ASGITransport(app=app, client=("192.168.3.4", 5555))
            async with httpx.AsyncClient(transport=remote, base_url="http://t") as c:
                for path in ("/v1/models", "/metrics", "/v1/audit/verify", "/"):
                    r = await c.get(path)
                    assert r.status_code == 403 and "loopback" in r.json()["detail"], path
                for path in ("/v2/health/live", "/v2/health/ready"):  # health checkers probe
                    assert (await c.get(path)).status_code == 200, path
                r = await c.post("/v1/generate", json={"labels": [1]})
                assert r.status_code == 403
            local = httpx.ASGITransport(app=app, client=("::1", 5555))
            async with httpx.AsyncClient(transport=local, base_url="http://t") as c:
                assert (await c.post("/v1/generate", json={"labels": [1]})).status_code == 200
                page = await c.get("/")
                assert page.status_code == 200 and "<progress" in page.text

    run(scenario())


def test_serve_announces_loopback_only_mode(model_dir, monkeypatch, caplog):
    import uvicorn

    from difforge.serving import app as app_module

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    caplog.set_level(logging.INFO, logger="difforge.serving")
    app_module.serve(model_dir, port=8123)
    assert seen == {
        "host": "127.0.0.1",
        "port": 8123,
        "log_level": "info",
        "proxy_headers": False,  # proxy trust comes from difforge's config only
    }
    assert "loopback clients only" in caplog.text


def test_cli_serve_passes_options(model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import difforge.serving
    from difforge.cli import app

    calls = []
    monkeypatch.setattr(difforge.serving, "serve", lambda *a, **kw: calls.append((a, kw)))
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"queue_size": 3}))
    args = ["serve", "--model", str(model_dir), "--port", "9001", "--config", str(cfg)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert calls == [
        ((str(model_dir),), {"host": "127.0.0.1", "port": 9001, "config_path": str(cfg)})
    ]


def test_rate_limit_is_per_key(model_dir):
    async def scenario():
        config = keyed_config(rate_limit=RateLimit(per_second=0.2, burst=2))
        async with running(make_service(model_dir, config), client_host="10.0.0.7") as c:
            body = {"labels": [1], "steps": 1}
            codes = [
                (await c.post("/v1/generate", json=body, headers=auth(GEN_KEY))).status_code
                for _ in range(3)
            ]
            assert codes == [200, 200, 429]
            r = await c.post("/v1/generate", json=body, headers=auth(GEN_KEY))
            assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 5
            other = await c.post("/v1/generate", json=body, headers=auth(OTHER_KEY))
            assert other.status_code == 200  # another key's bucket is untouched

    run(scenario())


def test_full_queue_answers_503_at_once_and_never_grows(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST, queue_size=2)
        async with running(svc) as c:
            slow_down(svc, DELAY)
            first = asyncio.create_task(c.post("/v1/generate", json=SLOW))
            await until(lambda: running_job(svc) is not None)
            queued = [
                asyncio.create_task(c.post("/v1/generate", json={**SLOW, "steps": 2, "seed": i}))
                for i in range(2)
            ]
            await until(lambda: svc.engine.depth == 2)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            rejected = await asyncio.gather(
                *[c.post("/v1/generate", json={"labels": [2], "seed": i}) for i in range(20)]
            )
            assert loop.time() - t0 < 2.0
            assert {r.status_code for r in rejected} == {503}
            assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
            assert svc.engine.depth == 2
            done = await asyncio.gather(first, *queued)
            assert [r.status_code for r in done] == [200, 200, 200]  # all accepted complete
            metrics = (await c.get("/metrics")).text
            assert 'difforge_errors_total{reason="queue_full",role="production"} 20.0' in metrics

    run(scenario())


def test_idempotency_key_replays_conflicts_and_mismatches(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            slow_down(svc, DELAY)
            body = {"labels": [4], "seed": 11, "steps": 2}
            first = await c.post("/v1/generate", json=body, headers={"Idempotency-Key": "abc"})
            images_before = svc.metrics.images.labels(
                svc.router.production.id, "dpmpp_2m"
            )._value.get()
            again = await c.post("/v1/generate", json=body, headers={"Idempotency-Key": "abc"})
            assert again.status_code == 200 and again.content == first.content
            assert again.headers["x-request-id"] == first.headers["x-request-id"]
            assert again.headers["idempotent-replayed"] == "true"
            images_after = svc.metrics.images.labels(
                svc.router.production.id, "dpmpp_2m"
            )._value.get()
            assert images_after == images_before  # not recomputed
            other = await c.post(
                "/v1/generate", json={**body, "seed": 12}, headers={"Idempotency-Key": "abc"}
            )
            assert other.status_code == 422
            slow = asyncio.create_task(
                c.post("/v1/generate", json=SLOW, headers={"Idempotency-Key": "slow"})
            )
            await until(lambda: bool(svc.engine.jobs))
            dup = await c.post("/v1/generate", json=SLOW, headers={"Idempotency-Key": "slow"})
            assert dup.status_code == 409 and int(dup.headers["retry-after"]) >= 1
            assert (await slow).status_code == 200
            bad = await c.post("/v1/generate", json={"steps": 0}, headers={"Idempotency-Key": "x"})
            fixed = await c.post(
                "/v1/generate", json={"steps": 0}, headers={"Idempotency-Key": "x"}
            )
            assert bad.status_code == fixed.status_code == 422  # failures are not stored

    run(scenario())


def test_deadline_drops_queued_requests_and_stops_running_ones(model_dir):
    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=0)
        async with running(svc) as c:
            slow_down(svc, DELAY)
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            running_req = asyncio.create_task(
                c.post(
                    "/v1/generate",
                    json={**SLOW, "deadline_ms": 400},
                    headers={"X-Request-Id": "deadline-running"},
                )
            )
            await until(lambda: running_job(svc) is not None)
            queued = await c.post(
                "/v1/generate",
                json={"labels": [2], "steps": 2, "seed": 5, "deadline_ms": 100},
                headers={"X-Request-Id": "deadline-queued"},
            )
            assert queued.status_code == 504  # still queued behind the slow call at its deadline
            r = await running_req
            assert r.status_code == 504 and r.headers["x-request-id"] == "deadline-running"
            await until(lambda: not svc.engine.jobs)
            assert loop.time() - t0 < 40 * DELAY  # the engine stopped before the call's end
            rec_running = svc.audit.get("deadline-running")
            rec_queued = svc.audit.get("deadline-queued")
            assert rec_queued["status"] == rec_running["status"] == "deadline_exceeded"
            assert rec_queued["detail"]["steps_completed"] == 0  # dropped before compute
            assert 0 < rec_running["detail"]["steps_completed"] < 40  # stopped mid-sampling
            nfe = svc.metrics.nfe.labels(svc.router.production.id)._value.get()
            assert 0 < nfe < 40  # forwards actually run: the call did not go on to the end
            metrics = (await c.get("/metrics")).text
            assert 'difforge_errors_total{reason="deadline",role="production"} 2.0' in metrics

    run(scenario())


def test_cancelling_one_request_keeps_its_batch_mates(model_dir):
    """A request cancelled mid-call loses its images; the others in the call still get theirs."""

    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=300)
        async with running(svc) as c:
            slow_down(svc, DELAY)
            mate = asyncio.create_task(c.post("/v1/generate", json={**SLOW, "seed": 1}))
            doomed = asyncio.create_task(
                c.post("/v1/generate", json={**SLOW, "seed": 2, "deadline_ms": 600})
            )
            r_doomed, r_mate = await asyncio.gather(doomed, mate)
            assert r_doomed.status_code == 504 and r_mate.status_code == 200
            assert r_mate.headers["content-type"] == "image/png"
            rows = svc.audit._db.execute("SELECT status, detail FROM audit ORDER BY seq").fetchall()
            assert [row["status"] for row in rows] == ["deadline_exceeded", "ok"]
            assert json.loads(rows[1]["detail"])["calls"] == [2]  # they did share the call

    run(scenario())


def test_client_disconnect_cancels_the_request(model_dir):
    """Both ways a client can go: the ASGI channel says http.disconnect (uvicorn), or the
    request task is cancelled (in-process clients)."""

    async def scenario():
        svc = make_service(model_dir, **FAST)
        app = create_app(svc)
        async with app.router.lifespan_context(app):
            await svc.wait_ready()
            slow_down(svc, DELAY)
            body = json.dumps(SLOW).encode()
            gone = asyncio.Event()
            sent = []

            async def receive():
                if not sent:
                    sent.append(1)
                    return {"type": "http.request", "body": body, "more_body": False}
                await gone.wait()
                return {"type": "http.disconnect"}

            async def send(message):
                sent.append(message)

            scope = {
                "type": "http",
                "asgi": {"version": "3.0"},
                "http_version": "1.1",
                "method": "POST",
                "scheme": "http",
                "path": "/v1/generate",
                "raw_path": b"/v1/generate",
                "query_string": b"",
                "root_path": "",
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"x-request-id", b"gone-0001"),
                ],
                "client": ("127.0.0.1", 1234),
                "server": ("127.0.0.1", 80),
            }
            call = asyncio.create_task(app(scope, receive, send))
            await until(lambda: running_job(svc) is not None)
            gone.set()
            await call
            await until(lambda: not svc.engine.jobs)
            record = svc.audit.get("gone-0001")
            assert record["status"] == "cancelled" and record["http_status"] == 499
            assert record["detail"]["steps_completed"] < 40

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                headers = {"x-request-id": "gone-0002"}
                task = asyncio.create_task(c.post("/v1/generate", json=SLOW, headers=headers))
                await until(lambda: running_job(svc) is not None)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
                await until(lambda: not svc.engine.jobs)
                record = svc.audit.get("gone-0002")
                assert record["status"] == "cancelled"
                assert record["detail"]["steps_completed"] < 40

    run(scenario())


def test_canary_share_is_stable_per_seed_and_labelled(model_dir, model_dir_b):
    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            canary = await svc.install(load(model_dir_b), role="canary", share=0.5)
            versions = {}
            for seed in range(12):
                r = await c.post("/v1/generate", json={"labels": [1], "seed": seed, "steps": 1})
                versions[seed] = r.headers["x-model-version"]
                again = await c.post("/v1/generate", json={"labels": [1], "seed": seed, "steps": 1})
                assert again.headers["x-model-version"] == versions[seed]  # stable per seed
            assert set(versions.values()) == {svc.router.production.id, canary.id}
            text = (await c.get("/metrics")).text
            assert (
                f'difforge_model_info{{name="tiny-b",role="canary",version="{canary.id}"}} 1.0'
                in text
            )
            assert f'difforge_images_total{{sampler="dpmpp_2m",version="{canary.id}"}}' in text
            models = (await c.get("/v1/models")).json()
            assert [m["role"] for m in models["models"]] == ["production", "canary"]
            assert models["canary_share"] == 0.5

    run(scenario())


def test_swapping_the_production_model_fails_no_request(model_dir, model_dir_b):
    async def scenario():
        svc = make_service(model_dir, **FAST, batch_wait_ms=5)
        old = svc.router.production.id
        async with running(svc) as c:
            slow_down(svc, 0.01)
            body = {"labels": [3], "steps": 8}
            before = [asyncio.create_task(c.post("/v1/generate", json=body)) for _ in range(6)]
            await until(lambda: running_job(svc) is not None)
            new = await svc.install(load(model_dir_b))  # loaded and warmed, then swapped in
            after = [asyncio.create_task(c.post("/v1/generate", json=body)) for _ in range(3)]
            rs = await asyncio.gather(*before, *after)
            assert [r.status_code for r in rs] == [200] * 9
            served = [r.headers["x-model-version"] for r in rs]
            assert set(served[:6]) == {old} and set(served[6:]) == {new.id}
            text = (await c.get("/metrics")).text
            assert (
                f'difforge_model_info{{name="tiny-b",role="production",version="{new.id}"}} 1.0'
                in text
            )
            assert 'difforge_model_info{name="tiny",' not in text

    run(scenario())


@pytest.mark.parametrize("fill", [0.0, 0.5])
def test_padded_call_waits_for_company_in_proportion_to_its_cost(model_dir, fill):
    """A padded call costs the same however few of its rows are real: once a call has shown what
    a step costs, the next one waits up to pad_fill_wait x its expected duration for company."""

    async def scenario():
        svc = make_service(
            model_dir, **FAST, batch_wait_ms=0, pad_fill_wait=fill, batch_invariance="pad"
        )
        async with running(svc) as c:
            assert svc.router.production.plan.mode == "pad"
            slow_down(svc, DELAY)
            body = {"labels": [3], "steps": 16, "sampler": "euler"}  # ~16 x DELAY = 0.4 s a call
            assert (await c.post("/v1/generate", json={**body, "seed": 0})).status_code == 200
            first = asyncio.create_task(
                c.post(
                    "/v1/generate", json={**body, "seed": 1}, headers={"X-Request-Id": "fill-first"}
                )
            )
            await asyncio.sleep(0.03)  # far inside 0.5 x 0.4 s, far outside batch_wait_ms
            second = await c.post(
                "/v1/generate", json={**body, "seed": 2}, headers={"X-Request-Id": "fill-second"}
            )
            assert (await first).status_code == second.status_code == 200
            calls = [svc.audit.get(rid)["detail"]["calls"] for rid in ("fill-first", "fill-second")]
            assert calls == ([[2], [2]] if fill else [[1], [1]])

    run(scenario())
