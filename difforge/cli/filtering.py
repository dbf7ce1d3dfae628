"""`difforge sample --filter`: run the output filters on the drawn images, print their decisions
and keep them in the grid PNG's text (key "filters"), as the service's PNGs carry them."""

from __future__ import annotations

import json
from collections import Counter

import typer


def sample_with_filters(model, samples, values: list[str], out: str) -> None:
    from difforge.cli.evaluate import filter_specs
    from difforge.common.png import save_grid_png
    from difforge.evaluation.filtering import evaluation_stage
    from difforge.pipeline import grid_metadata
    from difforge.pipeline.filters import Conditioning

    if samples.images.dtype.is_floating_point:
        from difforge.core.errors import InvalidArgumentError

        raise InvalidArgumentError("--filter applies to image models, not series")
    stage = evaluation_stage(filter_specs(values))
    result = stage(samples.images, Conditioning(samples.conditioning or {}))
    meta = grid_metadata(model, samples)
    meta["filters"] = json.dumps(
        {
            "filters": stage.versions(),
            "decisions": result.image_decisions,
            "images": result.records(),
        }
    )
    n = len(samples.seeds)
    nrow = min(n, max(model.num_classes, 1)) if samples.labels else None
    path = save_grid_png(out, samples.images, captions=samples.captions, metadata=meta, nrow=nrow)
    counts = Counter(result.image_decisions)
    summary = ", ".join(f"{counts[d]} {d}" for d in ("pass", "review", "refuse") if counts[d])
    typer.echo(
        f"wrote {path}: {n} images, {samples.sampler} {samples.steps} steps; filters: {summary}"
    )
    for i, decisions in enumerate(result.per_image):
        held = [r for d in decisions for r in d.reasons]
        if held:
            typer.echo(f"  image {i} (seed {samples.seeds[i]}): {'; '.join(held)}")
