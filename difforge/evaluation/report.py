"""The evaluation run: sample a model with one sampler setting, repeat over seeds, write a report.

`evaluate_model` draws `n` images per repeat, one repeat per seed (at least MIN_REPEATS: EDM
reports the minimum FID of three runs, and one number hides the seed spread), scores each repeat
with `evaluate_images`, and returns a JSON-able report:

  "metrics":    name -> {"mean", "std", "min", "max", "per_repeat"} over the repeats, or None when
                not computed (difforge.registry's gates read "mean"); FIDs against other splits
                are named "fid_<split>";
  "repeats":    per repeat: seed, metrics, metric settings, label counts, timings;
  "model", "sampler", "labels", "num_samples", "seeds": what was sampled, and how;
  "extractor", "classifier", "reference", "other_references", "train": what it was measured
                against (names, weights sha256, dataset content hashes);
  "software", "date", "wall_time_s", "config": when, with which code, from which settings.

Seeds, labels and sampler settings: `difforge.evaluation.config` and `.sampling`; the references
measured against: `.against`; code versions and JSON writing: `.records`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from difforge.common.distributed import current
from difforge.data.mnist import ImageDataset
from difforge.evaluation.against import Against, check_model_fits, load_against, score
from difforge.evaluation.config import SEED_STRIDE, EvalConfig, Log, make_config
from difforge.evaluation.evaluate import METRIC_KEYS
from difforge.evaluation.features import Classifier, FeatureExtractor
from difforge.evaluation.filtering import FilterInput, evaluation_stage, filter_images
from difforge.evaluation.records import describe_model, now_iso, run_info, write_json
from difforge.evaluation.reference import ReferenceStats
from difforge.evaluation.sampling import (
    describe_sampling,
    draw_with,
    image_seeds,
    in_batches,
    make_labels,
    resolve_sampling,
)
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import Model, load

REPORT_FORMAT = "difforge-eval-report/1"


def summarize(values: Sequence[float | None]) -> dict[str, Any] | None:
    """{"mean", "std", "min", "max", "per_repeat"} of one metric over repeats.

    std is the sample standard deviation (ddof = 1): the repeats are draws from the seed
    distribution. A repeat without a finite value leaves mean/std/min/max None, so a gate never
    reads a mean that silently skipped a failed repeat; all None gives None.
    """
    if all(v is None for v in values):
        return None
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"mean": None, "std": None, "min": None, "max": None}
    if len(finite) == len(values):
        a = np.asarray(finite)
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        out = {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max())}
    return out | {"per_repeat": list(values)}


def _run_repeat(
    model: Model,
    config: EvalConfig,
    sampling: dict,
    against: Against,
    seed: int,
    log: Log,
    stage=None,
) -> dict[str, Any]:
    labels = make_labels(config.labels, config.n, model.num_classes, seed)
    t0 = time.perf_counter()
    images, nfe = in_batches(
        draw_with(model, sampling), labels, image_seeds(seed, config.n), config.batch_size
    )
    sampling_s = round(time.perf_counter() - t0, 3)
    r = score(images, labels, against, seed)
    if stage is not None:  # the output filters, as the service runs them
        t1 = time.perf_counter()
        judged = filter_images(stage, images, labels, config.batch_size)
        r["metrics"]["filter_pass_rate"] = judged.pop("filter_pass_rate")
        r["filter_decisions"] = judged
        r["timings_s"]["filters"] = round(time.perf_counter() - t1, 3)
    m = r["metrics"]
    log(
        f"seed {seed}: {config.n} images in {sampling_s:.1f}s ({nfe} NFE); fid {m['fid']:.4g}, "
        f"kid {m['kid_mean']:.4g}"
    )
    counts = None if labels is None else np.bincount(labels, minlength=model.num_classes).tolist()
    r |= {"seed": seed, "nfe": nfe, "label_counts": counts}
    r["timings_s"] = {"sampling": sampling_s, **r["timings_s"]}
    return r


def _assemble(
    model: Model,
    config: EvalConfig,
    sampling: dict,
    against: Against,
    repeats: list,
    wall: float,
    filters: list | None = None,
) -> dict[str, Any]:
    names = [*METRIC_KEYS, *(f"fid_{k}" for k in against.others)]
    first = repeats[0]
    filtered = "filter_decisions" in first
    if filtered:
        names.append("filter_pass_rate")
    keep = ("seed", "nfe", "metrics", "settings", "label_counts", "timings_s")
    keep += ("filter_decisions",) if filtered else ()
    return {
        "format": REPORT_FORMAT,
        "model": describe_model(model),
        "sampler": describe_sampling(model, sampling, first["nfe"]),
        "num_samples": config.n,
        "num_repeats": len(repeats),
        "seeds": list(config.seeds),
        "image_seeds": f"seed * {SEED_STRIDE} + i for i < {config.n}",
        "labels": {"policy": config.labels, "num_classes": model.num_classes},
        "metrics": {k: summarize([r["metrics"].get(k) for r in repeats]) for k in names},
        "repeats": [{k: r[k] for k in keep} for r in repeats],
        "extractor": first["extractor"],
        "classifier": first["classifier"],
        "reference": first["reference"],
        "other_references": {k: ref.describe() for k, ref in against.others.items()},
        "train": first["train"],
        "wall_time_s": round(wall, 3),
        "date": now_iso(),
        "software": run_info(),
        "config": asdict(config),
        **({"filters": filters} if filtered and filters is not None else {}),
    }


def evaluate_model(
    model: Model | str | Path,
    config: EvalConfig | None = None,
    *,
    extractor: FeatureExtractor | None = None,
    reference: ReferenceStats | None = None,
    other_references: Mapping[str, ReferenceStats] | None = None,
    train: ImageDataset | Tensor | None = None,
    out: str | Path | None = None,
    log: Log | None = None,
    filters: FilterInput | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Sample `model` once per seed, score every repeat, and summarise them in one report.

    Args:
        model: a loaded Model or a model folder.
        config: the settings; or give them as keywords (`evaluate_model(m, steps=10, n=5000)`).
        extractor: the feature network; default: the shipped MNIST one.
        reference: statistics every metric compares against; default: MNIST `config.reference_split`.
        other_references: label -> statistics, FID only ("fid_<label>"); default (when
            `reference` is defaulted too and `config.other_split_fid`): the other MNIST split.
        train: the memorization set (ImageDataset or uint8 images); default: MNIST train.
        out: write the report there as JSON (atomically) as well.
        log: called with one line per repeat (e.g. `print`).
        filters: output filters (difforge.pipeline.filters: specs, names such as "quality", or a
            built stage) run on every repeat's images: the report then has the metric
            "filter_pass_rate", per repeat "filter_decisions", and "filters" (what ran).

    Returns:
        The report dict described in this module's docstring.
    """
    t0 = time.perf_counter()
    config = make_config(EvalConfig, config, settings)
    model = model if isinstance(model, Model) else load(model)
    log = log or (lambda _: None)
    with compute_threads(config.threads):
        against = load_against(model, config, extractor, reference, other_references, train)
        check_model_fits(model, against.extractor, config.n, against.reference.feature_dim)
        sampling = resolve_sampling(
            model, config.sampler, config.steps, config.guidance, config.grid, config.knobs
        )
        # the run's extractor judges quality too, when it classifies (the shipped net does)
        clf = against.extractor if isinstance(against.extractor, Classifier) else None
        stage = None if filters is None else evaluation_stage(filters, clf)
        repeats = [
            _run_repeat(model, config, sampling, against, s, log, stage) for s in config.seeds
        ]
    described = None if stage is None else stage.describe()
    wall = time.perf_counter() - t0
    report = _assemble(model, config, sampling, against, repeats, wall, described)
    if out is not None and current().is_main:  # under torchrun every rank holds the report
        write_json(out, report)
    return report
