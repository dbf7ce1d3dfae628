"""What every result file records about itself (code versions, date, the model measured), and the
strict-JSON atomic writer the reports and sweeps use.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difforge.common.atomic import write_text_atomic
from difforge.evaluation.threads import openblas_thread_controls
from difforge.pipeline import Model, code_version


def run_info() -> dict[str, Any]:
    """Versions of the code that produced a result."""
    from difforge import __version__

    return {
        "difforge": __version__,
        "git_commit": code_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "openblas_threads": [get() for get, _ in openblas_thread_controls()],
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_model(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "sha256": model.sha256,
        "path": None if model.path is None else str(model.path),
        "num_classes": model.num_classes,
        "image_shape": list(model.image_shape),
        "parameterization": model.config.parameterization,
        "trained_on": model.config.provenance.get("dataset"),
        "dataset_hash": model.config.provenance.get("dataset_hash"),
    }


def to_json_safe(x: Any) -> Any:
    """Strict-JSON copy: NaN -> None, +-inf -> "inf"/"-inf", tuples -> lists, numpy -> Python."""
    if isinstance(x, Mapping):
        return {str(k): to_json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as strict JSON (see `to_json_safe`), atomically; creates parent folders."""
    text = json.dumps(to_json_safe(data), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
