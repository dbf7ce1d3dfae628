"""Samples to files: a captioned grid as one PNG, its provenance in PNG text chunks
(the PNG writing itself is difforge.common.png)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

from difforge.common.png import save_grid_png
from difforge.pipeline.model import Model, Samples


def grid_metadata(model: Model, samples: Samples) -> dict[str, str]:
    """PNG text chunks recording where a grid of `samples` came from."""
    meta = {
        "model": model.name,
        "model_sha256": model.sha256,
        "sampler": samples.sampler,
        "steps": str(samples.steps),
        "guidance": repr(samples.guidance),
        "grid": samples.grid,
        "seeds": json.dumps(list(samples.seeds)),
        "labels": json.dumps(None if samples.labels is None else list(samples.labels)),
        "nfe": str(samples.nfe),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "synthetic": "true",
        "software": "difforge",
    }
    if samples.conditioning is not None:
        meta["conditioning"] = json.dumps(samples.conditioning)
    if samples.edit is not None:  # img2img / inpainting: the inputs by their sha256
        meta["edit"] = json.dumps(samples.edit)
    return meta


def save_samples_png(model: Model, samples: Samples, path: str | Path) -> Path:
    """A captioned grid of `samples` with the model's provenance in its text chunks."""
    n = len(samples.seeds)
    nrow = min(n, max(model.num_classes, 1)) if samples.labels else None
    return save_grid_png(
        path,
        samples.images,
        captions=samples.captions,
        metadata=grid_metadata(model, samples),
        nrow=nrow,
    )
