"""Defects found by an outside pass over the service (issue #15): non-finite model output, proxy
trust, disconnects while the body is sent, strict input handling, refused requests and rate limits."""

from __future__ import annotations

import httpx
import pytest

from difforge.serving import ServiceConfig, create_app
from tests.integration.serving_fixtures import make_service, make_tiny_model, run, running

FAST = {"torch_threads": 1, "warmup_steps": 1}


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
            assert metric(text, 'difforge_errors_total{reason="non_finite"}') == 1.0

    run(scenario())


def test_warm_up_refuses_a_model_with_non_finite_output(model_dir):
    svc = make_service(model_dir, **FAST)
    version = svc.router.production
    version.model.denoiser = NaNDenoiser(version.model.denoiser)

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
