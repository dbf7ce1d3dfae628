"""A report written by `evaluate_model` is what difforge.registry's promotion gates read.

Registers the tiny random model of tests/unit/test_eval_report.py in a SQLite registry, attaches
the runner's report file, and checks each gate sees the report's mean over repeats.
"""

from __future__ import annotations

import json

import pytest

from difforge.evaluation import evaluate_model, load_feature_extractor
from difforge.model import load
from difforge.registry import ConflictError, GateFailedError, Registry
from difforge.registry.gates import summarize_report
from tests.unit.test_eval_report import FAST, make_tiny_model, small_references

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """(model folder, report path, report) of the tiny model."""
    root = tmp_path_factory.mktemp("eval")
    folder = make_tiny_model(root / "tiny")
    extractor = load_feature_extractor()
    refs = small_references(extractor, root / "cache")
    path = root / "report.json"
    report = evaluate_model(load(folder), extractor=extractor, out=path, **refs, **FAST)
    return folder, path, report


@pytest.fixture
def reg(tmp_path):
    r = Registry(f"sqlite:///{tmp_path}/registry.db", tmp_path / "artifacts")
    yield r
    r.close()


def test_summary_reads_the_means_over_repeats(evaluated):
    folder, path, report = evaluated
    s = summarize_report(json.loads(path.read_text()))
    m = report["metrics"]
    assert s.metrics == {
        "fid": m["fid"]["mean"],
        "kid": m["kid_mean"]["mean"],
        "label_accuracy": m["label_accuracy"]["mean"],
        "memorization": m["memorization_rate"]["mean"],
        "precision": m["precision"]["mean"],
        "recall": m["recall"]["mean"],
    }
    assert s.num_samples == report["num_samples"] and s.seeds == (0, 1, 2)
    assert s.extractor_sha256 == report["extractor"]["sha256"]
    assert s.model_sha256 == load(folder).sha256


def test_gates_fail_and_pass_on_the_reported_values(evaluated, reg):
    folder, path, report = evaluated
    m = report["metrics"]
    fid, acc = m["fid"]["mean"], m["label_accuracy"]["mean"]
    info = reg.register(folder, "tiny", reports=[path]).info
    assert info.metrics["fid"] == fid

    with pytest.raises(GateFailedError, match="fid_max") as e:
        reg.promote("tiny", info.version, gates={"fid_max": fid * 0.99})
    (failure,) = e.value.failures
    assert failure.value == fid and failure.margin < 0

    gates = {"fid_max": fid * 1.01, "label_accuracy_min": acc, "memorization_max": 0.01}
    promotion = reg.promote("tiny", info.version, gates=gates)
    by_gate = {g.gate: g for g in promotion.gates}
    assert all(g.passed for g in promotion.gates) and set(by_gate) >= {*gates, "smoke_sample"}
    assert by_gate["fid_max"].value == fid
    assert by_gate["label_accuracy_min"].value == acc
    assert by_gate["memorization_max"].value == m["memorization_rate"]["mean"]


def test_a_report_of_other_weights_is_refused(evaluated, reg):
    folder, path, _ = evaluated
    other = reg.register(make_tiny_model(folder.parent / "other", seed=1), "tiny").info
    with pytest.raises(ConflictError, match="is for weights"):
        reg.attach_report("tiny", other.version, path)
