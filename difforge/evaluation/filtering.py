"""The output filter stage in an evaluation run: each repeat's images are judged as the service
would judge them (difforge.pipeline.filters), and the report carries `filter_pass_rate` (the
fraction of images every filter passed, summarised over repeats like any metric) and each
filter's decision counts, so a registry gate can hold a version to a pass rate.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import Tensor

from difforge.pipeline.filters import (
    Conditioning,
    FilterContext,
    FilterSpec,
    FilterStage,
    build_stage,
    pass_rate,
)

FilterInput = Sequence[FilterSpec | dict | str] | FilterStage


def evaluation_stage(filters: FilterInput, classifier=None) -> FilterStage:
    """A stage from specs, names ("quality") or dicts ({"name": ..., "options": ...}), or a built
    stage; filters that need a classifier get `classifier` (default: the shipped MNIST feature
    net)."""
    if isinstance(filters, FilterStage):
        return filters

    def load():
        if classifier is not None:
            return classifier
        from difforge.evaluation.features import load_feature_extractor

        return load_feature_extractor()

    specs = [
        f
        if isinstance(f, FilterSpec)
        else FilterSpec(name=f)
        if isinstance(f, str)
        else FilterSpec(**f)
        for f in filters
    ]
    return build_stage(specs, FilterContext(classifier=load))


def filter_images(
    stage: FilterStage, images: Tensor, labels: Sequence[int] | None, batch_size: int = 500
) -> dict[str, Any]:
    """Judge uint8 images (N, C, H, W) asked for `labels` (None: unconditional).

    Returns:
        {"filter_pass_rate": fraction passed by every filter, "decisions": {filter: {decision:
        count}}, "combined": {decision: count}}.
    """
    n = images.shape[0]
    asked = list(labels) if labels is not None else [None] * n
    results = []
    for start in range(0, n, batch_size):
        part = Conditioning({"labels": asked[start : start + batch_size]})
        results.append(stage(images[start : start + batch_size], part))
    per_filter: dict[str, Counter] = {f.name: Counter() for f in stage.filters}
    combined: Counter = Counter()
    for r in results:
        combined.update(r.image_decisions)
        for decisions in r.per_image:
            for d in decisions:
                per_filter[d.filter][d.decision] += 1
    return {
        "filter_pass_rate": pass_rate(results),
        "decisions": {k: dict(v) for k, v in per_filter.items()},
        "combined": dict(combined),
    }
