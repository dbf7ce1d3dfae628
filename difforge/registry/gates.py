"""Promotion gates: read metrics out of an evaluation report and check them against thresholds.

Reports come from difforge.evaluation; this module reads them defensively, so a report whose
metrics sit at the top level or under "metrics", as numbers or as {"mean": ...} over seeds,
under their short or long names ("kid" / "kid_mean", "memorization" / "memorization_rate"),
all give the same summary.

Release criteria beside image quality: `memorization` is the Gu et al. 2023 nearest-neighbour rate
of difforge.evaluation.metrics.memorization (share of samples whose nearest training image is
three times closer than the second nearest), gated by `memorization_max`; `filter_pass_rate` is
the share of evaluation samples the output filter passed, gated by `filter_pass_rate_min` (a
report without it fails a configured gate, like every metric gate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from difforge.core.errors import SamplingCancelled
from difforge.registry.config import Gates

# canonical metric name -> the keys a report may use for it, first match wins
METRIC_ALIASES: dict[str, tuple[str, ...]] = {
    "fid": ("fid",),
    "kid": ("kid", "kid_mean"),
    "label_accuracy": ("label_accuracy", "accuracy"),
    "memorization": ("memorization", "memorization_rate"),
    "precision": ("precision",),
    "recall": ("recall",),
    # share of sampled images the output filter (difforge.serving's filter stage) lets through,
    # as an evaluation run records it: "filter_pass_rate" at the top level or under "metrics"
    "filter_pass_rate": ("filter_pass_rate", "filter_pass"),
}


@dataclass(frozen=True)
class ReportSummary:
    """What the gates need from one evaluation report."""

    metrics: dict[str, float]  # canonical name -> value (absent when the report lacks it)
    num_samples: int | None = None
    extractor_sha256: str | None = None
    model_sha256: str | None = None  # the weights the report was computed on, if it says
    seeds: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "metrics": dict(self.metrics),
            "num_samples": self.num_samples,
            "extractor_sha256": self.extractor_sha256,
            "model_sha256": self.model_sha256,
            "seeds": None if self.seeds is None else list(self.seeds),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReportSummary:
        seeds = d.get("seeds")
        return cls(
            dict(d.get("metrics") or {}),
            d.get("num_samples"),
            d.get("extractor_sha256"),
            d.get("model_sha256"),
            None if seeds is None else tuple(seeds),
        )


def _number(value: Any) -> float | None:
    if isinstance(value, Mapping):  # {"mean": .., "std": ..} averaged over seeds
        value = value.get("mean", value.get("value"))
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _first(d: Mapping[str, Any], paths: tuple[tuple[str, ...], ...]) -> Any:
    for path in paths:
        node: Any = d
        for key in path:
            node = node.get(key) if isinstance(node, Mapping) else None
        if node is not None:
            return node
    return None


def summarize_report(report: Mapping[str, Any]) -> ReportSummary:
    """The gate-relevant numbers of an evaluation report (missing ones are left out)."""
    keys = ("metrics", "summary", "mean", "aggregate")  # where runners put (averaged) metrics
    sources = [s for s in (*(report.get(k) for k in keys), report) if isinstance(s, Mapping)]
    metrics: dict[str, float] = {}
    for name, keys in METRIC_ALIASES.items():
        for src in sources:
            found = next((v for k in keys if (v := _number(src.get(k))) is not None), None)
            if found is not None:
                metrics[name] = found
                break
    n = _first(report, (("num_samples",), ("sample_count",), ("settings", "num_samples")))
    extractor = _first(
        report,
        (
            ("feature_extractor_sha256",),
            ("extractor_sha256",),
            ("extractor", "sha256"),
            ("feature_extractor", "sha256"),
        ),
    )
    model = _first(
        report,
        (("model_sha256",), ("weights_sha256",), ("model", "sha256"), ("model", "weights_sha256")),
    )
    seeds = _first(report, (("seeds",), ("settings", "seeds"), ("settings", "seed")))
    seeds = [seeds] if isinstance(seeds, int) else seeds
    if not (isinstance(seeds, list) and all(_is_int(x) for x in seeds)):
        seeds = None
    return ReportSummary(
        metrics,
        int(n) if _is_int(n) else None,
        _digest(extractor),
        _digest(model),
        None if seeds is None else tuple(seeds),
    )


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _digest(x: Any) -> str | None:
    """A sha256 hex digest, with any "sha256:" prefix removed."""
    return x.removeprefix("sha256:") if isinstance(x, str) else None


@dataclass(frozen=True)
class GateResult:
    """One gate's verdict. margin > 0 is how far inside the threshold, < 0 how far outside."""

    gate: str
    passed: bool
    message: str
    value: float | None = None
    threshold: float | None = None
    margin: float | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "gate": self.gate,
            "passed": self.passed,
            "message": self.message,
            "value": self.value,
            "threshold": self.threshold,
            "margin": self.margin,
        }


def _g(x: float) -> str:
    return f"{x:.4g}"


def _at_most(gate: str, metric: str, value: float | None, limit: float, what: str) -> GateResult:
    if value is None:
        return GateResult(gate, False, f"{gate}: the report has no {metric}", None, limit)
    margin = limit - value
    if margin >= 0:
        msg = f"{gate}: {metric} {_g(value)} <= {what} {_g(limit)}"
        return GateResult(gate, True, msg, value, limit, margin)
    msg = f"{gate}: {metric} {_g(value)} > {what} {_g(limit)} (over by {_g(-margin)})"
    return GateResult(gate, False, msg, value, limit, margin)


def _at_least(gate: str, metric: str, value: float | None, limit: float) -> GateResult:
    if value is None:
        return GateResult(gate, False, f"{gate}: the report has no {metric}", None, limit)
    margin = value - limit
    if margin >= 0:
        return GateResult(
            gate, True, f"{gate}: {metric} {_g(value)} >= {_g(limit)}", value, limit, margin
        )
    msg = f"{gate}: {metric} {_g(value)} < {_g(limit)} (short by {_g(-margin)})"
    return GateResult(gate, False, msg, value, limit, margin)


def _ratio_gate(
    ratio: float, cand: ReportSummary, prod: ReportSummary | None, prod_label: str
) -> GateResult:
    gate = "fid_max_ratio_to_production"
    prod_fid = None if prod is None else prod.metrics.get("fid")
    if prod_fid is None:
        why = "nothing in production" if prod is None else f"{prod_label} has no FID"
        return GateResult(gate, True, f"{gate}: skipped ({why})", cand.metrics.get("fid"))
    for what, a, b in (
        ("feature extractor", cand.extractor_sha256, prod.extractor_sha256),
        ("sample count", cand.num_samples, prod.num_samples),
    ):
        if a is not None and b is not None and a != b:
            shown = (str(a)[:12], str(b)[:12])
            msg = f"{gate}: FIDs not comparable, {what} {shown[0]} vs {prod_label}'s {shown[1]}"
            return GateResult(gate, False, msg, cand.metrics.get("fid"))
    what = f"{_g(ratio)} x {prod_label}'s FID {_g(prod_fid)} ="
    return _at_most(gate, "fid", cand.metrics.get("fid"), ratio * prod_fid, what)


def check_gates(
    gates: Gates,
    candidate: ReportSummary | None,
    production: ReportSummary | None = None,
    production_label: str = "production",
) -> list[GateResult]:
    """Check every configured metric gate (not the smoke sample) of a candidate's report.

    Args:
        gates: thresholds; None fields are off.
        candidate: the summary of the candidate's latest report; None fails the "report" gate.
        production: the current production version's report summary, for the FID ratio.
        production_label: how messages name production, e.g. "production v3".

    Returns:
        One GateResult per configured gate, in a fixed order.
    """
    if candidate is None:
        return [GateResult("report", False, "report: no evaluation report for this version")]
    m = candidate.metrics
    results = []
    if gates.fid_max is not None:
        results.append(_at_most("fid_max", "fid", m.get("fid"), gates.fid_max, "fid_max"))
    if gates.fid_max_ratio_to_production is not None:
        results.append(
            _ratio_gate(gates.fid_max_ratio_to_production, candidate, production, production_label)
        )
    if gates.label_accuracy_min is not None:
        lab = m.get("label_accuracy")
        results.append(
            _at_least("label_accuracy_min", "label_accuracy", lab, gates.label_accuracy_min)
        )
    if gates.memorization_max is not None:
        mem = m.get("memorization")
        results.append(
            _at_most(
                "memorization_max", "memorization", mem, gates.memorization_max, "memorization_max"
            )
        )
    if gates.filter_pass_rate_min is not None:
        rate = m.get("filter_pass_rate")
        results.append(
            _at_least("filter_pass_rate_min", "filter_pass_rate", rate, gates.filter_pass_rate_min)
        )
    return results


def smoke_sample(model, images: int = 2, steps: int = 4, seed: int = 0) -> GateResult:
    """Sample a few images with few steps; fail on any non-finite state or prediction.

    Args:
        model: a loaded difforge.pipeline.Model.
        images, steps, seed: how much to sample.
    """
    bad: list[str] = []

    def check(info) -> None:  # the uint8 output would hide NaN, so look at every step
        if not (torch.isfinite(info.x).all() and torch.isfinite(info.denoised).all()):
            bad.append(f"step {info.i} (sigma {info.sigma:.4g})")
            raise SamplingCancelled  # no need to push NaN through the remaining steps

    try:
        with torch.random.fork_rng(devices=[]):
            model.sample(n=images, steps=steps, seed=seed, callback=check)
    except SamplingCancelled:
        pass
    except Exception as e:  # a model that cannot sample must not be promoted
        msg = f"smoke_sample: sampling raised {type(e).__name__}: {e}"
        return GateResult("smoke_sample", False, msg)
    if bad:
        return GateResult("smoke_sample", False, f"smoke_sample: non-finite values at {bad[0]}")
    msg = f"smoke_sample: {images} images, {steps} steps, all finite"
    return GateResult("smoke_sample", True, msg)
