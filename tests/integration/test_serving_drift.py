"""The drift monitor against a real shift: the shipped MNIST model, healthy and fed half the true
noise level, through POST /v1/generate, with the shipped feature net and the MNIST test reference.

Stated budget: R requests of 8 images (6 steps, guidance 3), a check after each from the second on
(windows of 16, 24, ... images). The healthy model's KID stays under kid_max at every check; the
degraded one is over it from the first check on (2 requests, 16 images). R = 2 in the fast suite,
12 under `slow`. The curve over more requests: benchmarks/drift.py (its RESULTS.md row)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.drift import WrongNoiseScale
from difforge.serving import ServiceConfig
from difforge.serving.drift import DriftConfig
from tests.integration.serving_fixtures import make_service, run, running, until, wrap_denoisers

MNIST_COND = Path(__file__).resolve().parents[2] / "models" / "mnist-cond"
PER_REQUEST, STEPS, WINDOW = 8, 6, 64
KID_MAX = 2000.0  # healthy ~ 0-700 at these window sizes, degraded ~ 7000 (benchmarks/drift.py)


class Pixels:
    """The 8x8 test models' images as 64-d features (the MNIST feature net reads 28x28)."""

    name, sha256, feature_dim = "pixels", "p" * 64, 64

    def features(self, x):
        return x.flatten(1).float()


def pixel_reference(tmp_path: Path) -> Path:
    """A reference statistics file of uniform-noise 8x8 "images" under `Pixels`."""
    import numpy as np

    from difforge.evaluation.metrics import feature_stats
    from difforge.evaluation.reference import ReferenceStats, save_reference_stats

    feats = np.random.default_rng(0).uniform(-1, 1, size=(100, 64)).astype(np.float32)
    stats = ReferenceStats("noise", "sha256:x", "pixels", "p" * 64, feats, *feature_stats(feats))
    return save_reference_stats(stats, tmp_path / "refs")


def drift_service(**drift):
    settings = {"enabled": True, "window": WINDOW, "min_samples": 16, "interval_s": 3600.0}
    config = ServiceConfig(audit_db=":memory:", drift=DriftConfig(**settings | drift))
    return make_service(MNIST_COND, config)


async def serve_and_check(service, requests: int):
    """`requests` requests; after each from the second, one check; returns the results, the
    final /metrics text and GET /v1/drift."""
    results = []
    async with running(service) as client:
        for r in range(requests):
            lab = [(PER_REQUEST * r + i) % 10 for i in range(PER_REQUEST)]  # classes cycle
            body = {"labels": lab, "seed": 1000 * r, "steps": STEPS, "n": PER_REQUEST}
            resp = await client.post("/v1/generate", json=body)
            assert resp.status_code == 200, resp.text
            if r >= 1:
                done = await service.drift.check(service.engine)
                results.append(next(iter(done.values())))
        metrics = (await client.get("/metrics")).text
        status = (await client.get("/v1/drift")).json()
    return results, metrics, status


@pytest.mark.parametrize("requests", [2, pytest.param(12, marks=pytest.mark.slow)])
def test_degraded_model_crosses_the_kid_threshold_healthy_stays_under(requests):
    healthy, metrics, status = run(serve_and_check(drift_service(kid_max=KID_MAX), requests))
    kids = [r["kid"] for r in healthy]
    assert all(k < KID_MAX for k in kids), kids
    windows = [min(PER_REQUEST * r, WINDOW) for r in range(2, requests + 1)]
    assert [r["samples"] for r in healthy] == windows
    (vid,) = status["versions"]
    assert status["versions"][vid]["exceeded"] == {"kid": False}
    assert f'difforge_drift_exceeded{{metric="kid",version="{vid}"}} 0.0' in metrics
    assert f'difforge_drift_samples{{version="{vid}"}} {windows[-1]:.1f}' in metrics
    assert healthy[-1]["class_tv"] <= 0.15  # the cycled classes are the reference's uniform mix
    assert healthy[-1]["steps_mean"] == STEPS and healthy[-1]["guidance_mean"] == 3.0

    service = drift_service(kid_max=KID_MAX)
    wrap_denoisers(service, lambda d: WrongNoiseScale(d, 0.5))
    degraded, metrics, status = run(serve_and_check(service, requests))
    assert degraded[0]["kid"] > KID_MAX, degraded[0]  # crossed at the first check (2 requests)
    assert all(r["kid"] > KID_MAX for r in degraded)
    assert min(r["kid"] for r in degraded) > 2 * max(kids)
    assert f'difforge_drift_exceeded{{metric="kid",version="{vid}"}} 1.0' in metrics
    assert status["versions"][vid]["exceeded"] == {"kid": True}
    assert status["versions"][vid]["reference"]["reference"]["name"] == "mnist-test"


def test_class_mix_shift_and_the_schedule_runs_on_its_own():
    """All requests for one class: the class-mix distance crosses class_tv_max, found by the
    background schedule (no check called by hand)."""

    async def scenario():
        service = drift_service(class_tv_max=0.5, interval_s=0.2, min_samples=8, window=16)
        async with running(service) as client:
            body = {"labels": 7, "seed": 1, "steps": 2, "n": 8}
            assert (await client.post("/v1/generate", json=body)).status_code == 200
            await until(lambda: service.drift.results, timeout=60)
            (result,) = service.drift.results.values()
            assert result["class_tv"] == pytest.approx(0.9)  # all mass on 1 of 10 classes
            assert result["class_chi2_p"] < 1e-6
            assert result["fid"] is None  # 8 images <= 128 feature dimensions
            text = (await client.get("/metrics")).text
            assert 'difforge_drift_exceeded{metric="class_tv"' in text
            assert "difforge_drift_threshold" in text
        return result

    run(scenario())


def test_drift_route_is_404_when_off(tmp_path):
    from tests.integration.serving_fixtures import make_tiny_model

    async def scenario():
        async with running(make_service(make_tiny_model(tmp_path / "m"))) as client:
            r = await client.get("/v1/drift")
            assert r.status_code == 404 and "drift" in r.json()["detail"]

    run(scenario())


def test_a_registry_versions_report_is_its_reference():
    """serve --registry: the monitor reads the served version's latest evaluation report (its
    reference set, label mix and sampler settings); a config path would take precedence."""
    from difforge.model import load
    from difforge.serving.drift import DriftMonitor
    from difforge.serving.metrics import ServiceMetrics
    from difforge.serving.router import ModelVersion

    version = ModelVersion(load(MNIST_COND), meta={"registry_name": "m", "registry_version": 3})
    report = {
        "reference": {"name": "mnist-test"},
        "repeats": [{"label_counts": [5] * 5 + [0] * 5}],
        "sampler": {"steps": 12, "guidance": 2.0},
    }
    asked = []
    monitor = DriftMonitor(DriftConfig(enabled=True), ServiceMetrics(), lambda: [version])
    monitor.report_for = lambda v: asked.append(v.meta["registry_version"]) or report
    ref = monitor._reference(version)
    assert asked == [3] and ref.source == "evaluation report"
    assert ref.stats.name == "mnist-test" and (ref.steps, ref.guidance) == (12, 2.0)
    assert ref.class_probs.tolist() == [0.2] * 5 + [0.0] * 6


def test_a_bad_drift_section_is_one_line_naming_the_field(tmp_path):
    from difforge.core.errors import InvalidArgumentError
    from difforge.serving.config import load_service_config

    path = tmp_path / "serve.json"
    path.write_text('{"drift": {"enabled": true, "window": 1, "kid_max": -3}}')
    with pytest.raises(InvalidArgumentError) as e:
        load_service_config(path)
    line = str(e.value)
    assert "drift.window" in line and "drift.kid_max" in line and "\n" not in line


def test_a_text_models_prompt_word_mix_is_compared_with_its_example_prompts(tmp_path):
    """A text model: requests without a prompt get the example prompts (no drift); requests that
    all ask for words the examples never use move the prompt word mix (prompt_tv over its max)."""
    from tests.text_fixtures import make_tiny_text_model

    ref_path = pixel_reference(tmp_path)
    drift = {"reference": str(ref_path), "prompt_tv_max": 0.3, "window": 8, "min_samples": 4}
    config = ServiceConfig(audit_db=":memory:", drift=DriftConfig(enabled=True, **drift))
    service = make_service(make_tiny_text_model(tmp_path / "text"), config)
    service.drift.extractor = Pixels()

    async def scenario():
        async with running(service) as client:
            assert (await client.post("/v1/generate", json={"n": 4, "seed": 0})).status_code == 200
            (first,) = (await service.drift.check(service.engine)).values()
            body = {"n": 4, "seed": 9, "prompt": "the digit seven"}
            assert (await client.post("/v1/generate", json=body)).status_code == 200
            (second,) = (await service.drift.check(service.engine)).values()
            return first, second, (await client.get("/metrics")).text

    first, second, metrics = run(scenario())
    assert first["prompt_tv"] == pytest.approx(0.0) and first["class_tv"] is None
    # window: 8 words of the examples ("a 7", "a 3") + 12 words never in them
    assert second["prompt_tv"] == pytest.approx(12 / 20) and second["samples"] == 8
    assert service.drift.exceeded(second) == {"prompt_tv": True}
    assert 'difforge_drift_exceeded{metric="prompt_tv"' in metrics


def test_serve_from_a_registry_hands_the_monitor_each_versions_report(tmp_path):
    from difforge.registry import Registry
    from difforge.serving.registry_source import open_service
    from tests.integration.serving_fixtures import make_tiny_model

    url, artifacts = f"sqlite:///{tmp_path}/registry.db", tmp_path / "artifacts"
    reg = Registry(url, artifacts)
    try:
        reg.register(make_tiny_model(tmp_path / "tiny"), name="tiny")
        report = {"metrics": {"fid": 5.0}, "reference": {"name": "mnist-test"}}
        reg.attach_report("tiny", 1, report)
        off = {"fid_max_ratio_to_production": None, "memorization_max": None}
        reg.promote("tiny", 1, gates=off | {"smoke_sample": False})
    finally:
        reg.close()
    config = ServiceConfig(audit_db=":memory:", drift=DriftConfig(enabled=True))
    service, source = open_service(url, "tiny", config, str(artifacts))
    try:
        assert service.drift.report_for(service.router.production) == report
    finally:
        source.registry.close()
        service.audit.close()


def test_a_model_the_feature_net_cannot_read_is_a_reported_check_error(tmp_path):
    """The tiny 8x8 model against the default (MNIST, 28x28) reference: the check fails with a
    message in GET /v1/drift and the error counter, and the service keeps serving."""
    from tests.integration.serving_fixtures import make_tiny_model

    async def scenario():
        config = ServiceConfig(
            audit_db=":memory:", drift=DriftConfig(enabled=True, min_samples=2, interval_s=3600)
        )
        service = make_service(make_tiny_model(tmp_path / "m"), config)
        async with running(service) as client:
            r = await client.post("/v1/generate", json={"n": 2, "seed": 0})
            assert r.status_code == 200
            assert await service.drift.check(service.engine) == {}
            status = (await client.get("/v1/drift")).json()
            metrics = (await client.get("/metrics")).text
            assert (await client.post("/v1/generate", json={"seed": 1})).status_code == 200
        return status, metrics

    status, metrics = run(scenario())
    (entry,) = status["versions"].values()
    assert "expected images (B, 1, 28, 28)" in entry["error"] and entry["result"] is None
    assert "difforge_drift_check_errors_total 2.0" in metrics  # at start, then at the check


def _cli(capsys, *args: str) -> tuple[int, str, str]:
    from difforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
    out = capsys.readouterr()
    return e.value.code, out.out, out.err


def test_difforge_drift_status_reads_a_running_service(tmp_path, capsys):
    """`difforge drift status` against a real uvicorn: before traffic, after a scheduled check,
    and one error line for a service whose monitor is off."""
    import time

    import httpx

    from difforge.serving import create_app
    from tests.integration.serving_fixtures import make_tiny_model
    from tests.integration.test_serving_browser import ServerThread, wait_ready

    drift = {"reference": str(pixel_reference(tmp_path)), "kid_max": 1e-9, "min_samples": 2}
    config = ServiceConfig(
        audit_db=":memory:", drift=DriftConfig(enabled=True, interval_s=0.2, **drift)
    )
    service = make_service(make_tiny_model(tmp_path / "m"), config)
    service.drift.extractor = Pixels()
    with ServerThread(create_app(service)) as url:
        wait_ready(service)
        code, out, _ = _cli(capsys, "drift", "status", "--url", url)
        assert code == 0 and out == "no version has served an image yet\n"
        r = httpx.post(f"{url}/v1/generate", json={"n": 4, "seed": 0, "labels": 3}, timeout=60)
        assert r.status_code == 200
        deadline = time.monotonic() + 60
        while "checked on" not in out:
            assert time.monotonic() < deadline, out
            time.sleep(0.2)
            code, out, _ = _cli(capsys, "drift", "status", "--url", url)
        vid = service.router.production.id
        assert out.startswith(f"{vid}: 4 images in the window; checked on 4: kid ")
        assert "class_tv 0.9" in out and out.rstrip().endswith("over: kid")
        code, out, _ = _cli(capsys, "drift", "status", "--url", url, "--json")
        assert code == 0 and json.loads(out)["versions"][vid]["exceeded"] == {"kid": True}
    off = make_service(make_tiny_model(tmp_path / "off"))
    with ServerThread(create_app(off)) as url:
        code, _, err = _cli(capsys, "drift", "status", "--url", url)
    assert (
        code == 2
        and err == "error: HTTP 404: the drift monitor is off (drift.enabled in the config)\n"
    )
