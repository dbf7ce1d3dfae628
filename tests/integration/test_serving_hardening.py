"""Defects found by an outside pass over the service (issue #15): non-finite model output, proxy
trust, disconnects while the body is sent, strict input handling, refused requests and rate limits."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from difforge.serving import ApiKey, RateLimit, ServiceConfig, create_app, hash_key
from tests.integration.serving_fixtures import (
    SlowDenoiser,
    make_service,
    make_tiny_model,
    run,
    running,
    slow_down,
    wrap_denoisers,
)

FAST = {"torch_threads": 1, "warmup_steps": 1}
JSON = {"content-type": "application/json"}
JSON_UTF8 = {"content-type": "application/json; charset=utf-8"}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("hardening") / "tiny")


class NaNDenoiser:
    """A denoiser whose output is NaN (a model that overflows), for chosen labels or all."""

    def __init__(self, denoiser, labels=None):
        self.denoiser, self.labels = denoiser, labels

    def __call__(self, x, sigma, cond=None):
        out = self.denoiser(x, sigma, cond).clone()
        if self.labels is None:
            return out * float("nan")
        hit = sum((cond["labels"] == lab) for lab in self.labels).bool()  # (B,)
        out[hit] = float("nan")
        return out


async def until(predicate, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


def metric(text: str, line_start: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


# --- non-finite output ---------------------------------------------------------------------------


def test_non_finite_output_fails_the_request_counted_and_audited(model_dir):
    svc = make_service(model_dir, **FAST)

    async def scenario():
        async with running(svc) as c:
            version = svc.router.production
            version.model.denoiser = NaNDenoiser(version.model.denoiser, labels=[3])
            outcomes = []
            svc.outcome_observers.append(lambda job, ok, latency: outcomes.append(ok))
            r = await c.post("/v1/generate", json={"labels": [3], "seed": 1})
            assert r.status_code == 500, r.text
            assert "non-finite" in r.json()["detail"]
            rid = r.headers["x-request-id"]
            assert outcomes == [False]  # the canary's window sees a failure
            record = svc.audit.get(rid)
            assert record["status"] == "non_finite" and record["http_status"] == 500
            ok = await c.post("/v1/generate", json={"labels": [2], "seed": 1})
            assert ok.status_code == 200 and outcomes == [False, True]
            text = (await c.get("/metrics")).text
            assert (
                metric(text, 'difforge_errors_total{reason="non_finite",role="production"}') == 1.0
            )

    run(scenario())


def test_warm_up_refuses_a_model_with_non_finite_output(model_dir):
    svc = make_service(model_dir, **FAST)
    version = svc.router.production
    wrap_denoisers(svc, NaNDenoiser)  # the denoiser the default "kernels" mode serves with

    async def scenario():
        await svc.start()
        try:
            with pytest.raises(Exception, match="non-finite"):
                await svc.wait_ready(timeout=60)
            assert not svc.ready and not version.ready
        finally:
            await svc.stop()

    run(scenario())


# --- proxy trust ---------------------------------------------------------------------------------


async def _get(app, client, path, headers=None):
    transport = httpx.ASGITransport(app=app, client=(client, 5555))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        return await c.get(path, headers=headers)


def test_x_forwarded_for_from_an_untrusted_peer_gives_no_loopback_access(
    model_dir, monkeypatch, tmp_path
):
    """The app exactly as `difforge serve` hands it to uvicorn, wrapped by uvicorn's middleware
    for those settings, with FORWARDED_ALLOW_IPS=* as many container images set it."""
    import uvicorn

    from difforge.serving import app as app_module

    monkeypatch.setenv("FORWARDED_ALLOW_IPS", "*")
    monkeypatch.chdir(tmp_path)  # the default audit database lands here
    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(app=app, kw=kw))
    app_module.serve(model_dir)
    config = uvicorn.Config(seen["app"], **seen["kw"])
    config.load()
    spoof = {"X-Forwarded-For": "127.0.0.1"}

    async def scenario():
        app = seen["app"]
        async with app.router.lifespan_context(app):
            await app.state.service.wait_ready()
            for path in ("/metrics", "/v1/audit/verify", "/v1/models"):
                r = await _get(config.loaded_app, "203.0.113.9", path, spoof)
                assert r.status_code == 403, (path, r.text)
            assert (await _get(config.loaded_app, "127.0.0.1", "/metrics")).status_code == 200

    run(scenario())


def test_only_configured_proxies_are_believed(model_dir):
    cfg = ServiceConfig(audit_db=":memory:", trusted_proxies=("10.0.0.0/8",), **FAST)

    async def scenario():
        svc = make_service(model_dir, cfg)
        app = create_app(svc)
        async with app.router.lifespan_context(app):
            await svc.wait_ready()
            # through the trusted proxy: the client is the right-most untrusted hop
            fwd = {"X-Forwarded-For": "127.0.0.1, 203.0.113.9, 10.1.2.3"}
            assert (await _get(app, "10.0.0.2", "/metrics", fwd)).status_code == 403
            local = {"X-Forwarded-For": "203.0.113.9, 127.0.0.1"}
            assert (await _get(app, "10.0.0.2", "/metrics", local)).status_code == 200
            # the proxy itself, with no header, is its own (non-loopback) client
            assert (await _get(app, "10.0.0.2", "/metrics")).status_code == 403
            # a peer outside the list is never believed
            assert (await _get(app, "192.0.2.1", "/metrics", local)).status_code == 403

    run(scenario())
    with pytest.raises(ValueError, match="not an IP address"):
        ServiceConfig(trusted_proxies=("proxy.local",))


# --- strict input handling -----------------------------------------------------------------------


def test_generate_takes_only_non_empty_json_without_duplicate_keys(model_dir):
    good = json.dumps({"labels": [1], "seed": 1, "steps": 1}).encode()

    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            for ctype in (None, "text/plain", "application/x-www-form-urlencoded"):
                headers = {} if ctype is None else {"content-type": ctype}
                r = await c.post("/v1/generate", content=good, headers=headers)
                assert r.status_code == 415, (ctype, r.text)
            r = await c.post("/v1/generate", files={"f": ("a.json", good)})  # multipart
            assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
            r = await c.post("/v1/generate", content=good, headers=JSON_UTF8)
            assert r.status_code == 200  # parameters of the media type are fine
            for body in (b"", b"  \n"):
                r = await c.post("/v1/generate", content=body, headers=JSON)
                assert r.status_code == 422 and r.json()["detail"][0]["type"] == "missing"
            for body, loc in (
                (b'{"labels": [1], "labels": [2]}', ["body", "labels"]),
                (b'{"labels": [1], "options": {"eta": 0.1, "eta": 0.2}}', ["body", "eta"]),
            ):
                r = await c.post("/v1/generate", content=body, headers=JSON)
                assert r.status_code == 422, body
                (err,) = r.json()["detail"]
                assert err["type"] == "duplicate_key" and err["loc"] == loc
            assert svc.engine.depth == 0 and not svc.engine.jobs

    run(scenario())


def test_header_sizes_are_bounded(model_dir):
    body = {"labels": [1], "seed": 1, "steps": 1}

    async def scenario():
        svc = make_service(model_dir, **FAST)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json=body, headers={"Idempotency-Key": "k" * 5000})
            assert r.status_code == 422 and r.json()["detail"][0]["loc"] == [
                "header",
                "idempotency-key",
            ]
            ok = await c.post("/v1/generate", json=body, headers={"Idempotency-Key": "k" * 128})
            assert ok.status_code == 200
            r = await c.post("/v1/generate", json=body, headers={"X-Pad": "p" * 9000})
            assert r.status_code == 431
            assert (
                await c.get("/v2/health/live", headers={"X-Pad": "p" * 9000})
            ).status_code == 431

    run(scenario())


# --- a client that leaves while sending the body -------------------------------------------------


def test_a_disconnect_while_sending_the_body_is_a_disconnect_not_a_500(model_dir, caplog):
    svc = make_service(model_dir, **FAST)
    app = create_app(svc)
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
        "headers": [(b"content-type", b"application/json"), (b"host", b"t")],
        "client": ("127.0.0.1", 5555),
        "server": ("t", 80),
    }
    incoming = [{"type": "http.request", "body": b'{"labels": [', "more_body": True}]
    sent = []

    async def receive():
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    async def scenario():
        async with app.router.lifespan_context(app):
            await svc.wait_ready()
            await app(scope, receive, send)

    run(scenario())
    assert sent[0]["status"] == 499
    text = svc.metrics.exposition().decode()
    assert metric(text, 'difforge_errors_total{reason="disconnect",role="none"}') == 1.0
    assert metric(text, 'difforge_errors_total{reason="internal",role="none"}') == 0.0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


# --- rate-limit tokens and refusals before work --------------------------------------------------


def test_requests_refused_before_work_spend_no_rate_limit_tokens(model_dir):
    limited = ApiKey(
        id="gen",
        sha256=hash_key("gen-secret-1f2e"),
        rate_limit=RateLimit(per_second=0.001, burst=2),
    )
    free = ApiKey(id="free", sha256=hash_key("free-secret-3c4d"))
    cfg = ServiceConfig(audit_db=":memory:", api_keys=(limited, free), queue_size=1, **FAST)
    gen, other = {"Authorization": "Bearer gen-secret-1f2e"}, {"X-API-Key": "free-secret-3c4d"}
    slow = {"labels": [1], "steps": 40, "sampler": "euler"}
    quick = {"labels": [2], "steps": 1}

    async def scenario():
        svc = make_service(model_dir, cfg)
        async with running(svc, client_host="10.0.0.7") as c:
            slow_down(svc, 0.025)
            running_one = asyncio.create_task(c.post("/v1/generate", json=slow, headers=other))
            await until(lambda: any(j.started for j in svc.engine.jobs.values()))
            queued = asyncio.create_task(c.post("/v1/generate", json=slow, headers=other))
            await until(lambda: svc.engine.depth == 1)
            refused = [await c.post("/v1/generate", json=quick, headers=gen) for _ in range(4)]
            assert {r.status_code for r in refused} == {503}
            assert [r.status_code for r in await asyncio.gather(running_one, queued)] == [200, 200]
            codes = [(await c.post("/v1/generate", json=quick, headers=gen)).status_code]
            codes += [(await c.post("/v1/generate", json=quick, headers=gen)).status_code]
            codes += [(await c.post("/v1/generate", json=quick, headers=gen)).status_code]
            assert codes == [200, 200, 429]  # the burst of 2 was still there

    run(scenario())


def test_requests_refused_while_warming_up_spend_no_rate_limit_tokens(model_dir):
    limited = ApiKey(
        id="gen",
        sha256=hash_key("gen-secret-1f2e"),
        rate_limit=RateLimit(per_second=0.001, burst=2),
    )
    cfg = ServiceConfig(audit_db=":memory:", api_keys=(limited,), **FAST)
    gen = {"Authorization": "Bearer gen-secret-1f2e"}
    quick = {"labels": [2], "steps": 1}

    async def scenario():
        svc = make_service(model_dir, cfg)
        version = svc.router.production
        served = []  # the denoiser the default "kernels" mode serves with, before the wrapper
        wrap_denoisers(svc, lambda d: served.append(d) or SlowDenoiser(d, 0.2))  # a long warm-up
        app = create_app(svc)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, client=("10.0.0.7", 5555))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
                refused = [await c.post("/v1/generate", json=quick, headers=gen) for _ in range(4)]
                assert [r.status_code for r in refused] == [503] * 4
                assert all(r.json()["detail"] == "the model is warming up" for r in refused)
                await svc.wait_ready(timeout=60)
                version.model.denoiser = served[0]
                codes = [
                    (await c.post("/v1/generate", json=quick, headers=gen)).status_code
                    for _ in range(3)
                ]
                assert codes == [200, 200, 429]

    run(scenario())
