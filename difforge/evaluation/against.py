"""What the samples are measured against: the feature extractor, the reference statistics (MNIST by
default), the other splits' statistics and the memorization set; and scoring one repeat on them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation.config import SPLITS, EvalConfig
from difforge.evaluation.evaluate import evaluate_images
from difforge.evaluation.features import FeatureExtractor, extract, load_feature_extractor
from difforge.evaluation.metrics import check_fid_sample_count, feature_stats, fid_from_stats
from difforge.evaluation.reference import ReferenceStats, reference_stats
from difforge.pipeline import Model


@dataclass(frozen=True)
class Against:
    """The extractor, the reference statistics and the training set a run measures against."""

    extractor: FeatureExtractor
    reference: ReferenceStats
    others: dict[str, ReferenceStats]  # label -> stats, FID only ("fid_<label>")
    train: ImageDataset | Tensor | None  # memorization set; None skips it


def default_reference(
    split: str, extractor: FeatureExtractor, cache_dir: str | Path | None = None
) -> ReferenceStats:
    """Reference statistics of MNIST `split` under `extractor`, from the disk cache if it matches."""
    check_choice("reference split", split, SPLITS)
    return reference_stats(load_mnist(split), extractor, cache_dir=cache_dir)


def check_reference(reference: Any) -> None:
    if reference is not None and not isinstance(reference, ReferenceStats):
        raise InvalidArgumentError(
            f"reference must be ReferenceStats, got {type(reference).__name__} "
            "(to pick an MNIST split, set reference_split)"
        )


def check_trained_on_mnist(model: Model) -> None:
    """The default references are MNIST's: refuse a model whose provenance names another dataset
    (a model without provenance passes; the extractor still checks the image shape)."""
    spec = model.config.provenance.get("dataset")
    kind = spec.get("kind") if isinstance(spec, Mapping) else spec
    if isinstance(kind, str) and not kind.lower().startswith("mnist"):
        raise InvalidArgumentError(
            f"model {model.name!r} was trained on {json.dumps(spec)}, but the default references "
            "are MNIST; pass reference= (and train=) computed on its dataset"
        )


def load_against(
    model: Model,
    config: EvalConfig,
    extractor: FeatureExtractor | None,
    reference: ReferenceStats | None,
    other_references: Mapping[str, ReferenceStats] | None,
    train: ImageDataset | Tensor | None,
) -> Against:
    """Fill in MNIST defaults for whatever was not given (see `evaluate_model`)."""
    check_reference(reference)
    if reference is None or (config.memorization and train is None):
        check_trained_on_mnist(model)
    extractor = extractor or load_feature_extractor()
    others = dict(other_references or {})
    if reference is None:
        reference = default_reference(config.reference_split, extractor, config.cache_dir)
        if other_references is None and config.other_split_fid:
            other = next(s for s in SPLITS if s != config.reference_split)
            others[other] = default_reference(other, extractor, config.cache_dir)
    if config.memorization and train is None:
        train = load_mnist("train")
    return Against(extractor, reference, others, train if config.memorization else None)


def check_model_fits(model: Model, extractor: FeatureExtractor, n: int, dim: int) -> None:
    """Fail before sampling when the extractor cannot read the model's images or n is too small."""
    check_fid_sample_count(n, dim)
    try:
        extractor.features(torch.zeros(2, *model.image_shape))
    except InvalidArgumentError as e:
        raise InvalidArgumentError(
            f"model {model.name!r} makes {tuple(model.image_shape)} images, which extractor "
            f"{extractor.name!r} cannot read: {e}"
        ) from None


def score(
    images: Tensor, labels: Sequence[int] | None, against: Against, seed: int
) -> dict[str, Any]:
    """`evaluate_images` of one repeat, plus "fid_<label>" against each other reference."""
    lab = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    r = evaluate_images(images, lab, against.extractor, against.reference, against.train, seed=seed)
    if against.others:
        t0 = time.perf_counter()
        stats = feature_stats(extract(against.extractor.features, images))
        for name, ref in against.others.items():
            r["metrics"][f"fid_{name}"] = fid_from_stats(*stats, ref.mu, ref.sigma)
        r["timings_s"]["fid_other"] = round(time.perf_counter() - t0, 3)
    return r
