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
    # the registry's promotion gate reads the same number, and refuses this model
    from difforge.registry import Gates, check_gates, summarize_report

    summary = summarize_report(report)
    assert summary.metrics["filter_pass_rate"] == rate["mean"]
    gates = Gates(fid_max_ratio_to_production=None, memorization_max=None, filter_pass_rate_min=0.5)
    (gate,) = check_gates(gates, summary)
    assert gate.gate == "filter_pass_rate_min" and not gate.passed


def test_real_digits_pass_and_mislabelled_ones_do_not(extractor):
    test = load_mnist("test")
    images, labels = test.images[:300], test.labels[:300].tolist()
    stage = evaluation_stage(["quality", {"name": "policy"}], extractor)
    ok = filter_images(stage, images, labels, batch_size=128)
    assert ok["filter_pass_rate"] >= 0.95 and set(ok["decisions"]) == {"quality", "policy"}
    bad = filter_images(stage, images, [(y + 3) % 10 for y in labels], batch_size=128)
    assert bad["filter_pass_rate"] <= 0.05


def test_sample_cli_runs_the_filters_and_keeps_their_decisions(tmp_path, capsys):
    import json

    from difforge.cli import main
    from difforge.common.png import png_text

    folder = make_tiny_model(tmp_path / "tiny")
    out = tmp_path / "grid.png"
    args = ["sample", "--model", str(folder), "--labels", "0,1,2", "--steps", "2", "--seed", "4"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--filter", "quality", "--out", str(out)])
    assert e.value.code == 0
    printed = capsys.readouterr().out
    record = json.loads(png_text(out.read_bytes())["filters"])
    assert record["filters"] == [{"name": "quality", "version": "1"}]
    assert len(record["decisions"]) == 3 and len(record["images"]) == 3
    n_review = record["decisions"].count("review")
    assert (f"{n_review} review" in printed) == (n_review > 0)
    assert printed.count("quality ") == n_review  # one line per held image, with its score
    with pytest.raises(SystemExit) as e:
        main([*args, "--filter", "nsfw", "--out", str(out)])
    assert e.value.code == 2 and "unknown filter 'nsfw'" in capsys.readouterr().err
