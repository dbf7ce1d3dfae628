"""Promotion gates as pure functions: report summaries, thresholds, messages, gates files."""

from __future__ import annotations

import json
import math

import pytest

from difforge.registry import Gates, ReportSummary, check_gates, parse_gates, summarize_report

GATES = Gates(
    fid_max=30, fid_max_ratio_to_production=1.1, label_accuracy_min=0.95, memorization_max=0.01
)


def summary(**metrics) -> ReportSummary:
    return ReportSummary(metrics, num_samples=1000, extractor_sha256="e" * 64)


@pytest.mark.parametrize(
    "report",
    [
        {"metrics": {"fid": 12.0, "kid_mean": 0.01, "memorization_rate": 0.0}},  # evaluate_images
        {"fid": 12.0, "kid": 0.01, "memorization": 0.0},  # flat
        {"metrics": {"fid": {"mean": 12.0, "std": 0.3}, "kid": {"mean": 0.01}, "memorization": 0}},
    ],
)
def test_summaries_agree_across_report_layouts(report):
    assert summarize_report(report).metrics == {"fid": 12.0, "kid": 0.01, "memorization": 0.0}


def test_summary_reads_counts_hashes_and_seeds_and_skips_missing_metrics():
    s = summarize_report(
        {
            "metrics": {"fid": 3.0, "label_accuracy": None, "precision": math.nan},
            "settings": {"num_samples": 500, "seeds": [0, 1]},
            "extractor": {"name": "lenet", "sha256": "ab" * 32},
            "model": {"sha256": "cd" * 32},
        }
    )
    assert s.metrics == {"fid": 3.0}
    assert (s.num_samples, s.extractor_sha256, s.model_sha256, s.seeds) == (
        500, "ab" * 32, "cd" * 32, (0, 1),
    )  # fmt: skip
    assert ReportSummary.from_dict(s.to_dict()) == s


def test_summary_reads_runner_layouts_defensively():
    s = summarize_report(
        {
            "seeds": [{"seed": 0, "metrics": {"fid": 9.0}}],  # per-seed results, not seeds
            "mean": {"fid": 10.0, "label_accuracy": 0.98},
            "model_sha256": "sha256:" + "ab" * 32,
            "feature_extractor": {"sha256": "cd" * 32},
        }
    )
    assert s.metrics == {"fid": 10.0, "label_accuracy": 0.98} and s.seeds is None
    assert (s.model_sha256, s.extractor_sha256) == ("ab" * 32, "cd" * 32)


def test_every_gate_passes_with_its_margin():
    results = check_gates(
        GATES, summary(fid=20.0, label_accuracy=0.97, memorization=0.0), summary(fid=20.0)
    )
    assert [r.gate for r in results] == [
        "fid_max", "fid_max_ratio_to_production", "label_accuracy_min", "memorization_max",
    ]  # fmt: skip
    assert all(r.passed for r in results)
    assert [r.margin for r in results] == pytest.approx([10.0, 2.0, 0.02, 0.01])


def test_failures_name_the_gate_and_the_margin():
    cand = summary(fid=34.0, label_accuracy=0.9, memorization=0.03)
    results = {r.gate: r for r in check_gates(GATES, cand, summary(fid=20.0), "production v3")}
    assert not any(r.passed for r in results.values())
    assert results["fid_max"].message == "fid_max: fid 34 > fid_max 30 (over by 4)"
    assert results["fid_max_ratio_to_production"].message == (
        "fid_max_ratio_to_production: fid 34 > 1.1 x production v3's FID 20 = 22 (over by 12)"
    )
    assert results["label_accuracy_min"].message == (
        "label_accuracy_min: label_accuracy 0.9 < 0.95 (short by 0.05)"
    )
    assert results["memorization_max"].margin == pytest.approx(-0.02)


def test_missing_metric_or_report_fails_and_unset_gates_are_skipped():
    unconditional = summary(fid=10.0, memorization=0.0)
    failed = [r for r in check_gates(GATES, unconditional) if not r.passed]
    assert [r.message for r in failed] == ["label_accuracy_min: the report has no label_accuracy"]
    assert check_gates(GATES, None)[0].message == "report: no evaluation report for this version"
    off = Gates(fid_max_ratio_to_production=None, memorization_max=None)
    assert check_gates(off, unconditional) == []


def test_ratio_gate_is_skipped_without_production_fid_and_refuses_incomparable_fids():
    (ratio,) = [r for r in check_gates(GATES, summary(fid=10.0)) if r.gate.startswith("fid_max_")]
    assert ratio.passed and "skipped (nothing in production)" in ratio.message
    prod = ReportSummary({"fid": 10.0}, num_samples=5000, extractor_sha256="e" * 64)
    (ratio,) = [
        r for r in check_gates(GATES, summary(fid=9.0), prod) if r.gate.startswith("fid_max_")
    ]
    assert (
        not ratio.passed
        and "not comparable, sample count 1000 vs production's 5000" in ratio.message
    )


def test_gates_file_overrides_defaults_and_rejects_unknown_keys(tmp_path):
    path = tmp_path / "gates.json"
    path.write_text(json.dumps({"fid_max": 30, "memorization_max": None}))
    g = parse_gates(path)
    assert (g.fid_max, g.memorization_max, g.fid_max_ratio_to_production) == (30, None, 1.1)
    path.write_text(json.dumps({"fid_maximum": 30}))
    with pytest.raises(ValueError, match="unknown gate 'fid_maximum' \\(allowed: fid_max, "):
        parse_gates(path)
    with pytest.raises(
        ValueError, match="label_accuracy_min: Input should be less than or equal to 1"
    ):
        parse_gates({"label_accuracy_min": 95})


def test_filter_pass_rate_gate_passes_fails_and_needs_the_metric():
    gates = Gates(
        fid_max_ratio_to_production=None, memorization_max=None, filter_pass_rate_min=0.98
    )
    reports = {
        "pass": {"metrics": {"fid": 12.0, "filter_pass_rate": {"mean": 0.995, "std": 0.002}}},
        "fail": {"fid": 12.0, "filter_pass_rate": 0.9},
        "missing": {"metrics": {"fid": 12.0}},
    }
    (ok,) = check_gates(gates, summarize_report(reports["pass"]))
    assert ok.gate == "filter_pass_rate_min" and ok.passed and ok.margin == pytest.approx(0.015)
    (bad,) = check_gates(gates, summarize_report(reports["fail"]))
    assert not bad.passed
    assert bad.message == "filter_pass_rate_min: filter_pass_rate 0.9 < 0.98 (short by 0.08)"
    (missing,) = check_gates(gates, summarize_report(reports["missing"]))
    assert not missing.passed and missing.message.endswith("the report has no filter_pass_rate")
    assert (
        check_gates(Gates(fid_max_ratio_to_production=None, memorization_max=None), summary()) == []
    )


def test_memorization_gate_reads_the_evaluation_reports_rate():
    gates = Gates(fid_max_ratio_to_production=None, memorization_max=0.01)
    ok = check_gates(gates, summarize_report({"metrics": {"memorization_rate": {"mean": 0.0}}}))
    bad = check_gates(gates, summarize_report({"metrics": {"memorization_rate": {"mean": 0.05}}}))
    assert ok[0].passed and not bad[0].passed and bad[0].margin == pytest.approx(-0.04)
    with pytest.raises(Exception, match="filter_pass_rate_min"):
        parse_gates({"filter_pass_rate_min": 1.5})
