"""Defects found by an outside pass over the service (issue #15): non-finite model output, proxy
trust, disconnects while the body is sent, strict input handling, refused requests and rate limits."""

from __future__ import annotations

import pytest

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
