"""The quality filter with the shipped feature net, end to end: `difforge evaluate --filter`
writes filter_pass_rate into the report, and a service with the filter holds the random 28x28
model's images (the feature net believes none of them) while counting its pass rate."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from difforge.cli import app
from difforge.serving import ServiceConfig
from tests.integration.serving_fixtures import make_service, run, running
from tests.integration.test_cli_evaluate import FAST, small_data  # noqa: F401  (autouse)
from tests.unit.test_eval_report import N, make_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("quality") / "tiny")


def test_evaluate_cli_reports_the_filter_pass_rate(tiny, tmp_path):
    out, filters = tmp_path / "report.json", tmp_path / "filters.json"
    filters.write_text(json.dumps([{"name": "quality", "options": {"threshold": 0.9}}]))
    args = ["evaluate", "--model", str(tiny), *FAST, "--out", str(out), "--no-memorization"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--filter", str(filters), "--filter", "policy"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    rate = report["metrics"]["filter_pass_rate"]
    assert "filter_pass_rate" in result.stdout and len(rate["per_repeat"]) == 3
    assert [f["name"] for f in report["filters"]] == ["quality", "policy"]
    assert report["filters"][0]["threshold"] == 0.9
    for r, value in zip(report["repeats"], rate["per_repeat"], strict=True):
        assert value == r["filter_decisions"]["combined"].get("pass", 0) / N
    bad = CliRunner().invoke(app, [*args[:-1], "nope"])
    assert bad.exit_code == 2 and "unknown filter 'nope'" in bad.output


def test_a_service_with_the_quality_filter_holds_what_the_feature_net_doubts(tiny):
    async def scenario():
        filters = {"stage": [{"name": "quality", "options": {"threshold": 0.99}}]}
        config = ServiceConfig(
            audit_db=":memory:", torch_threads=1, warmup_steps=1, filters=filters
        )
        svc = make_service(tiny, config)
        async with running(svc) as c:
            r = await c.post("/v1/generate", json={"labels": [3, 5], "seed": 1, "steps": 2})
            assert r.status_code == 202
            listed = (await c.get("/v1/admin/review")).json()["held"]
            checks = [image[0] for image in listed[0]["filters"]]
            assert all(ch["filter"] == "quality" and ch["score"] < 0.99 for ch in checks)
            version = svc.router.production.id
            assert svc.screen.pass_rate(version) == 0.0
            metrics = (await c.get("/metrics")).text
            assert f'difforge_filter_pass_ratio{{version="{version}"}} 0.0' in metrics

    run(scenario())


def test_the_shipped_review_config_fits_the_shipped_model():
    from pathlib import Path

    from difforge.serving.config import load_service_config

    root = Path(__file__).resolve().parents[2]
    config = load_service_config(root / "configs" / "serve-review.json")
    config = config.model_copy(update={"audit_db": ":memory:"})
    svc = make_service(root / "models" / "mnist-cond", config)  # runs the stage once at start
    assert svc.screen.enabled and svc.screen.stage.versions() == [
        {"name": "policy", "version": "1"}
    ]
    assert svc.screen.stage.describe()[0]["classifier"]["name"] == "difforge-mnist-features-v1"
