"""Fallback under load over HTTP (in-process, tiny model): the circuit breaker forced open by a
low SLO serves degradable requests with fewer steps, says so in the header, body, provenance,
audit log and metrics, gives exactly the pixels of a normal request with those steps, and closes
again once probes run fast. Also the cheap route through the fast version (a distilled student of
production: `serve --fast`, `service.install(model, "fast")`) and the error counter's role label."""

from __future__ import annotations

import json

import pytest

from difforge.core.errors import InvalidArgumentError
from difforge.model import load
from difforge.serving import ServiceConfig, png_text
from difforge.serving.app import build_service
from difforge.serving.breaker import BreakerConfig
from difforge.serving.router import ModelVersion
from tests.distill_fixtures import make_student, make_teacher
from tests.integration.serving_fixtures import (
    make_service,
    run,
    running,
    slow_down,
    wrap_denoisers,
)

FAST = {"torch_threads": 1, "warmup_steps": 1, "batch_wait_ms": 0}
BODY = {"labels": [3], "seed": 11, "steps": 4, "response_format": "json"}


def metric(text: str, line_start: str) -> float:
    (line,) = [ln for ln in text.splitlines() if ln.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


def forced_open(**overrides) -> BreakerConfig:
    """An SLO no request meets: two measured requests open it; no cool-down ends in a test."""
    cfg = {"latency_slo_s": 1e-6, "min_samples": 2, "cooldown_s": 3600, "degraded_steps": 2}
    return BreakerConfig(**{**cfg, **overrides})


def test_an_open_breaker_degrades_allowed_requests_and_says_so(model_dir):
    svc = make_service(model_dir, breaker=forced_open(), **FAST)

    async def scenario():
        async with running(svc) as c:
            normal_2 = await c.post("/v1/generate", json={**BODY, "steps": 2})
            assert normal_2.status_code == 200 and "x-difforge-degraded" not in normal_2.headers
            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            assert "x-difforge-degraded" not in r.headers  # still closed: 1 of min_samples 2
            assert svc.fallback.breaker.state == "open"

            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            assert r.status_code == 200, r.text
            assert r.headers["x-difforge-degraded"] == "steps=2"
            body = r.json()
            assert body["steps"] == 2 and body["role"] == "production"
            assert body["degraded"] == {
                "reason": "latency",
                "requested_steps": 4,
                "requested_sampler": "dpmpp_2m",
                "steps": 2,
                "sampler": "dpmpp_2m",
            }
            assert body["images"][0]["degraded"]["requested_steps"] == 4  # provenance
            # exactly the pixels of a normal 2-step request with the same seed
            assert r.headers["x-output-sha256"] == normal_2.headers["x-output-sha256"]
            assert body["images"][0]["png_base64"] != ""

            record = svc.audit.get(r.headers["x-request-id"])
            assert record["status"] == "ok" and record["params"]["steps"] == 2
            assert record["detail"]["degraded"]["requested_steps"] == 4

            png = await c.post(
                "/v1/generate", json={"labels": [1], "seed": 3, "allow_degraded": True}
            )
            assert png.headers["content-type"] == "image/png"
            text = png_text(png.content)
            assert text["steps"] == "2" and json.loads(text["degraded"])["requested_steps"] == 4

            for allow in (False, None):  # opting out, and the "allowed" policy's default
                body = {**BODY} if allow is None else {**BODY, "allow_degraded": allow}
                r = await c.post("/v1/generate", json=body)
                assert "x-difforge-degraded" not in r.headers and r.json()["steps"] == 4

            models = (await c.get("/v1/models")).json()
            assert models["breaker"]["state"] == "open" and models["breaker"]["reason"] == "latency"
            text = (await c.get("/metrics")).text
            assert metric(text, 'difforge_breaker_state{state="open"}') == 1.0
            assert metric(text, 'difforge_breaker_state{state="closed"}') == 0.0
            assert metric(text, 'difforge_breaker_transitions_total{state="open"}') == 1.0
            assert metric(text, 'difforge_degraded_requests_total{reason="latency"}') == 2.0
            assert metric(text, 'difforge_degraded_requests_total{reason="queue_wait"}') == 0.0
            assert metric(text, 'difforge_generate_requests_total{role="production"}') == 6.0

    run(scenario())


def test_policy_always_when_open_and_never(model_dir):
    async def degraded_header(policy: str) -> list[str | None]:
        svc = make_service(model_dir, breaker=forced_open(degrade=policy), **FAST)
        async with running(svc) as c:
            for seed in (1, 2):
                await c.post("/v1/generate", json={**BODY, "seed": seed})
            out = []
            for allow in (None, True, False):
                r = await c.post("/v1/generate", json={**BODY, "allow_degraded": allow})
                assert r.status_code == 200, r.text
                out.append(r.headers.get("x-difforge-degraded"))
            return out

    async def scenario():
        assert await degraded_header("always_when_open") == ["steps=2", "steps=2", None]
        assert await degraded_header("never") == [None, None, None]

    run(scenario())


def test_the_breaker_closes_when_probes_run_fast(model_dir):
    cfg = forced_open(latency_slo_s=0.5, cooldown_s=1.0, probes=2, close_ratio=1.0)
    svc = make_service(model_dir, breaker=cfg, **FAST)
    clock = [0.0]
    svc.fallback.breaker.clock = lambda: clock[0]

    async def scenario():
        async with running(svc) as c:
            originals = [v.model.denoiser for _, v in svc.router.versions()]
            slow_down(svc, 0.2)  # 4 dpmpp_2m steps, guided: over 0.8 s a request
            for seed in (1, 2):
                await c.post("/v1/generate", json={**BODY, "seed": seed})
            assert svc.fallback.breaker.state == "open"
            wrap_denoisers(svc, lambda d: originals[0])  # load falls
            clock[0] += 1.0
            assert svc.fallback.breaker.state == "half_open"
            for _ in range(2):  # the probes take the normal route
                r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
                assert "x-difforge-degraded" not in r.headers and r.json()["steps"] == 4
            assert svc.fallback.breaker.state == "closed"
            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            assert "x-difforge-degraded" not in r.headers
            text = (await c.get("/metrics")).text
            assert metric(text, 'difforge_breaker_state{state="closed"}') == 1.0
            assert metric(text, 'difforge_breaker_transitions_total{state="half_open"}') == 1.0

    run(scenario())


def test_metrics_show_the_breaker_closing_when_idle(model_dir):
    svc = make_service(model_dir, breaker=forced_open(window_s=5.0), **FAST)
    clock = [0.0]

    async def scenario():
        async with running(svc) as c:
            svc.fallback.breaker.clock = lambda: clock[0]
            for seed in (1, 2):
                await c.post("/v1/generate", json={**BODY, "seed": seed})
            text = (await c.get("/metrics")).text
            assert metric(text, 'difforge_breaker_state{state="open"}') == 1.0
            clock[0] += 6.0  # no request for longer than window_s
            text = (await c.get("/metrics")).text  # no request in between: the scrape updates it
            assert metric(text, 'difforge_breaker_state{state="closed"}') == 1.0

    run(scenario())


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tiny teacher (dpmpp_2m, 6 steps) and its 2-step euler student (tests.distill_fixtures)."""
    root = tmp_path_factory.mktemp("breaker-fast")
    teacher = make_teacher(root / "teacher")
    return teacher, make_student(teacher, root / "student")


def test_an_open_breaker_uses_the_installed_student(pair, tmp_path):
    teacher_dir, student_dir = pair
    svc = make_service(teacher_dir, breaker=forced_open(fast_steps=3), **FAST)

    async def scenario():
        async with running(svc) as c:
            stranger = ModelVersion(load(make_teacher(tmp_path / "other", seed=1)))
            with pytest.raises(InvalidArgumentError, match="not a distilled student"):
                await svc.install(stranger, "fast")  # the one check: router.check_fast
            fast = await svc.install(load(student_dir), "fast")
            for seed in (1, 2):
                await c.post("/v1/generate", json={**BODY, "seed": seed})
            assert svc.fallback.breaker.state == "open"
            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            # the student's own sampler at fast_steps, not the request's dpmpp_2m at 4
            assert r.headers["x-difforge-degraded"] == f"steps=3; sampler=euler; model={fast.id}"
            assert r.headers["x-model-version"] == fast.id
            body = r.json()
            assert body["role"] == "fast" and body["steps"] == 3 and body["sampler"] == "euler"
            assert body["degraded"]["model_version"] == fast.id
            # exactly the pixels of asking the fast route for 3 steps (one resolver, one model)
            asked = {**BODY, "steps": 3, "route": "fast", "allow_degraded": False}
            same = await c.post("/v1/generate", json=asked)
            assert "x-difforge-degraded" not in same.headers
            assert r.headers["x-output-sha256"] == same.headers["x-output-sha256"]
            text = (await c.get("/metrics")).text
            assert metric(text, 'difforge_generate_requests_total{role="fast"}') == 2.0
            info = f'difforge_model_info{{name="{fast.name}",role="fast",version="{fast.id}"}}'
            assert metric(text, info) == 1.0
            models = (await c.get("/v1/models")).json()
            assert [m["role"] for m in models["models"]] == ["production", "fast"]  # listed once
            assert models["breaker"]["fast_model"] == fast.id
            assert svc.remove_fast() is fast
            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            assert r.headers["x-difforge-degraded"] == "steps=2"
            assert r.headers["x-model-version"] == svc.router.production.id
            r = await c.post("/v1/generate", json={**BODY, "route": "fast"})
            assert r.status_code == 422  # one fast version: removed for both paths

    run(scenario())


def test_a_student_given_before_start_is_warmed_and_used(pair):
    teacher_dir, student_dir = pair
    config = ServiceConfig(audit_db=":memory:", breaker=forced_open(), **FAST)
    svc = build_service(teacher_dir, config, fast=student_dir)  # serve --fast
    fast = svc.router.fast
    assert fast is not None and not fast.ready

    async def scenario():
        async with running(svc) as c:
            assert fast.ready  # warmed with the production version before ready
            for seed in (1, 2):
                await c.post("/v1/generate", json={**BODY, "seed": seed})
            r = await c.post("/v1/generate", json={**BODY, "allow_degraded": True})
            assert r.headers["x-model-version"] == fast.id
            # its own defaults: 2 euler steps
            assert r.headers["x-difforge-degraded"] == f"steps=2; sampler=euler; model={fast.id}"

    run(scenario())


def test_errors_carry_the_role_they_were_routed_to(model_dir):
    svc = make_service(model_dir, **FAST)

    async def scenario():
        async with running(svc) as c:
            bad = await c.post("/v1/generate", json={"steps": 0})
            assert bad.status_code == 422
            slow_down(svc, 0.05)
            late = await c.post("/v1/generate", json={**BODY, "deadline_ms": 1})
            assert late.status_code == 504
            text = (await c.get("/metrics")).text
            assert metric(text, 'difforge_errors_total{reason="validation",role="none"}') == 1.0
            assert metric(text, 'difforge_errors_total{reason="deadline",role="production"}') == 1.0
            assert metric(text, 'difforge_errors_total{reason="deadline",role="canary"}') == 0.0

    run(scenario())


def test_serve_fast_from_the_cli(pair, tmp_path, monkeypatch):
    import uvicorn
    from typer.testing import CliRunner

    from difforge.cli import app

    teacher_dir, student_dir = pair
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda asgi, **kw: ran.append(asgi))
    cfg = tmp_path / "serve.json"
    cfg.write_text(json.dumps({"audit_db": ":memory:", "breaker": {"degraded_steps": 2}}))
    args = ["serve", "--model", str(teacher_dir), "--config", str(cfg), "--fast"]
    result = CliRunner().invoke(app, [*args, str(student_dir)])
    assert result.exit_code == 0, result.output
    (asgi,) = ran
    service = asgi.state.service
    assert service.router.fast.name == "tiny-teacher-progressive"
    assert service.fallback.status()["fast_model"] == service.router.fast.id

    result = CliRunner().invoke(app, [*args, str(teacher_dir)])  # no student of itself
    assert result.exit_code != 0
    assert "not a distilled student" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(teacher_dir), "--fast-model", "x"])
    assert result.exit_code != 0 and "No such option" in result.output  # one flag: --fast
