"""Output filters in an evaluation run: a report carries filter_pass_rate over its repeats."""

from __future__ import annotations

import pytest

from difforge.data.mnist import load_mnist
from difforge.evaluation import evaluate_model
from difforge.evaluation.filtering import evaluation_stage, filter_images
from difforge.model import load
from tests.unit.test_eval_report import FAST, N, make_tiny_model, small_references

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_report_carries_the_filter_pass_rate(extractor, tmp_path):
    model = load(make_tiny_model(tmp_path / "tiny"))
    refs = small_references(extractor, tmp_path / "cache")
    refs.pop("train")
    report = evaluate_model(
        model, extractor=extractor, **refs, **FAST, memorization=False, filters=["quality"]
    )
    rate = report["metrics"]["filter_pass_rate"]
    assert len(rate["per_repeat"]) == 3
    for r, value in zip(report["repeats"], rate["per_repeat"], strict=True):
        combined = r["filter_decisions"]["combined"]
        assert sum(combined.values()) == N
        assert value == combined.get("pass", 0) / N
        assert r["filter_decisions"]["decisions"]["quality"] == combined
    # random weights draw no digit the feature net believes in
    assert rate["mean"] < 0.5
    assert report["filters"][0]["name"] == "quality"
    assert report["filters"][0]["classifier"]["sha256"] == extractor.sha256


def test_real_digits_pass_and_mislabelled_ones_do_not(extractor):
    test = load_mnist("test")
    images, labels = test.images[:300], test.labels[:300].tolist()
    stage = evaluation_stage(["quality", {"name": "policy"}], extractor)
    ok = filter_images(stage, images, labels, batch_size=128)
    assert ok["filter_pass_rate"] >= 0.95 and set(ok["decisions"]) == {"quality", "policy"}
    bad = filter_images(stage, images, [(y + 3) % 10 for y in labels], batch_size=128)
    assert bad["filter_pass_rate"] <= 0.05
