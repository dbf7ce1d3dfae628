"""Typed, frozen registry settings: where the database and artifacts live, and the default gates.

A gates file is JSON with any subset of `Gates`' fields, e.g.

    {"fid_max": 30, "fid_max_ratio_to_production": 1.1,
     "label_accuracy_min": 0.95, "memorization_max": 0.01, "filter_pass_rate_min": 0.98}

Fields left out keep their defaults; set a field to null to switch that gate off.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difforge.common.validation import error_line
from difforge.core.errors import InvalidArgumentError

DEFAULT_URL = "sqlite:///registry.db"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Gates(_Frozen):
    """Quality gates a version must pass before it becomes `production` or `canary`.

    Metric gates read the version's latest evaluation report; a configured gate whose metric
    the report lacks fails. Absolute thresholds depend on the dataset and extractor, so they are
    off by default; the defaults only forbid regressions, memorization and broken weights.
    """

    fid_max: float | None = Field(None, gt=0)  # FID <= this
    # FID <= this x current production's FID (same extractor and sample count); skipped while
    # nothing is in production or production has no FID
    fid_max_ratio_to_production: float | None = Field(1.1, gt=0)
    label_accuracy_min: float | None = Field(None, ge=0, le=1)  # class-conditional models
    memorization_max: float | None = Field(0.01, ge=0, le=1)  # fraction of memorized samples
    # fraction of evaluation samples the output filter passed (the report's "filter_pass_rate");
    # off by default: reports carry it only when the evaluation ran the filter
    filter_pass_rate_min: float | None = Field(None, ge=0, le=1)
    smoke_sample: bool = True  # load from the registry, sample, refuse on NaN/inf
    smoke_images: int = Field(2, ge=1, le=64)
    smoke_steps: int = Field(4, ge=1, le=1000)


class RegistryConfig(_Frozen):
    """Where a registry lives and which gates it applies unless a promotion passes its own."""

    url: str = DEFAULT_URL  # any SQLAlchemy URL: sqlite:///path.db, postgresql+psycopg://...
    # content-addressed artifact store; default: "<sqlite file stem>-artifacts" beside the
    # SQLite file (required for other databases, whose files must live on a shared disk)
    artifacts: str | None = None
    gates: Gates = Field(default_factory=Gates)
    lock_timeout_s: float = Field(60.0, gt=0)  # how long a writer waits for the write lock


def parse_gates(
    gates: Gates | Mapping[str, Any] | str | Path | None, base: Gates | None = None
) -> Gates:
    """Gates from a `Gates`, a dict or a JSON file path; fields not given keep `base`'s values.

    Args:
        gates: the overrides; None gives `base`.
        base: defaults for fields left out (default: `Gates()`).

    Returns:
        The validated, frozen Gates.
    """
    base = base or Gates()
    if gates is None:
        return base
    if isinstance(gates, Gates):
        return gates
    source = "gates"
    if isinstance(gates, str | Path):
        source = str(gates)
        try:
            gates = json.loads(Path(gates).read_text())
        except json.JSONDecodeError as e:
            raise InvalidArgumentError(f"{source} is not valid JSON: {e}") from None
        if not isinstance(gates, dict):
            raise InvalidArgumentError(f"{source} must hold a JSON object of gates")
    try:
        return Gates.model_validate({**base.model_dump(), **dict(gates)})
    except ValidationError as e:
        line = error_line(e, root="gates", allowed=Gates.model_fields, noun="gate")
        raise InvalidArgumentError(f"{source}: {line}") from None
