"""What a registration records about a model folder, gathered from the folder and its run.

A training run writes RUN/config.json (the TrainConfig), RUN/metrics.jsonl and RUN/model/ (the
model folder); the model's config.json carries `provenance` (dataset content hash, code version,
steps, final loss). Evaluation reports are JSON files in the model folder named eval*.json or
report*.json, or any JSON file under its evaluation/ or reports/ subfolder, plus any passed in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline import CARD_FILE, CONFIG_FILE, ModelConfig
from difforge.registry.errors import ConflictError
from difforge.registry.gates import ReportSummary, summarize_report

REPORT_GLOBS = ("eval*.json", "report*.json", "evaluation/*.json", "reports/*.json")
# provenance keys that describe how training went (the rest describe where the model came from)
TRAINING_METRIC_KEYS = (
    "step",
    "images_seen",
    "final_loss",
    "nonfinite_total",
    "parameters",
    "train_seconds",
)


@dataclass(frozen=True)
class Report:
    """An evaluation report to attach: the raw JSON, its summary and where it came from."""

    report: dict[str, Any]
    summary: ReportSummary
    source: str


@dataclass(frozen=True)
class Provenance:
    """Everything recorded with a version besides its files."""

    config: ModelConfig
    dataset_hash: str | None
    code_version: str | None
    training_config: dict[str, Any] | None
    training_metrics: dict[str, Any]
    card: str


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _training_config(folder: Path, card: str) -> dict[str, Any] | None:
    """The TrainConfig JSON: RUN/config.json beside the model folder, else the card's json block."""
    for path in (folder / "train_config.json", folder.parent / CONFIG_FILE):
        data = _read_json(path) if path.is_file() else None
        if isinstance(data, dict) and "format" not in data and "net" in data:
            return data
    blocks = re.findall(r"```json\s*\n(.*?)\n```", card, flags=re.S)
    for block in reversed(blocks):
        try:
            data = json.loads(block)
        except json.JSONDecodeError:
            continue
        if isinstance(data, dict):
            return data
    return None


def _last_metrics_row(folder: Path) -> dict[str, Any] | None:
    path = folder.parent / "metrics.jsonl"
    if not path.is_file():
        return None
    for line in reversed(path.read_text().splitlines()):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            return row
    return None


def gather_provenance(folder: Path, config: ModelConfig) -> Provenance:
    """Provenance of the model folder `folder` (whose config.json parsed to `config`)."""
    card_path = folder / CARD_FILE
    card = card_path.read_text() if card_path.is_file() else ""
    p = config.provenance
    metrics = {k: p[k] for k in TRAINING_METRIC_KEYS if k in p}
    last = _last_metrics_row(folder)
    if last is not None:
        metrics["last_logged"] = last
    return Provenance(
        config=config,
        dataset_hash=p.get("dataset_hash"),
        code_version=p.get("code_version"),
        training_config=_training_config(folder, card),
        training_metrics=metrics,
        card=card,
    )


def make_report(report: Mapping[str, Any], source: str, weights_sha256: str) -> Report:
    """Check a report fits the weights and has at least one metric the gates know."""
    if not isinstance(report, Mapping):
        raise InvalidArgumentError(f"evaluation report {source} must be a JSON object")
    summary = summarize_report(report)
    if not summary.metrics:
        raise InvalidArgumentError(
            f"evaluation report {source} has no metric the registry knows "
            "(fid, kid, label_accuracy, memorization, precision, recall)"
        )
    if summary.model_sha256 not in (None, weights_sha256):
        raise ConflictError(
            f"evaluation report {source} is for weights {summary.model_sha256[:12]}..., "
            f"not these ({weights_sha256[:12]}...)"
        )
    return Report(dict(report), summary, source)


def find_reports(folder: Path) -> list[Path]:
    """Report files inside a model folder (JSON files with no known metric are passed over)."""
    found = sorted({p for pattern in REPORT_GLOBS for p in folder.glob(pattern) if p.is_file()})
    return [
        p for p in found if isinstance(d := _read_json(p), dict) and summarize_report(d).metrics
    ]


def load_reports(
    folder: Path | None,
    extra: Sequence[str | Path | Mapping[str, Any]],
    weights_sha256: str,
) -> list[Report]:
    """Reports found in `folder` plus the `extra` ones (paths or dicts), checked and summarized."""
    out: list[Report] = []
    for item in [*(find_reports(folder) if folder else []), *extra]:
        if isinstance(item, Mapping):
            out.append(make_report(item, "(passed in)", weights_sha256))
            continue
        path = Path(item)
        if not path.is_file():
            raise FileNotFoundError(f"evaluation report not found: {path}")
        data = _read_json(path)
        if data is None:
            raise InvalidArgumentError(f"evaluation report {path} is not valid JSON")
        out.append(make_report(data, str(path), weights_sha256))
    return out
