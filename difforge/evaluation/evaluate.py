"""All metrics for one set of generated images: the step a report runner repeats per seed.

`evaluate_images` returns a JSON-able dict:
  "metrics":   name -> float, or None when the inputs for it were not given (stable keys, so a
               runner can average any metric over seeds);
  "settings":  every knob that changes a number (sample counts, subset sizes, k, thresholds, seed);
  "extractor", "classifier", "reference", "train": what the numbers were measured against;
  "timings_s": wall time of each stage.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.data.hashing import content_hash
from difforge.data.mnist import ImageDataset
from difforge.evaluation.features import Classifier, FeatureExtractor, extract
from difforge.evaluation.metrics import (
    KID_DEFAULT_SUBSET_SIZE,
    KID_DEFAULT_SUBSETS,
    MEMORIZATION_RATIO,
    PR_DEFAULT_K,
    check_fid_sample_count,
    diversity,
    feature_stats,
    fid_from_stats,
    kid,
    label_accuracy,
    memorization,
    precision_recall,
)
from difforge.evaluation.reference import ReferenceStats

# A sample is a near duplicate when its nearest other sample is closer than DUP_FRACTION times
# the reference set's RMS pairwise feature distance sqrt(2 Tr Sigma_ref). With the shipped MNIST
# extractor, 0.04 flags 0.2% of real test images at N = 1000 (0.16% at N = 5000), while a copy of
# an image with uniform +-8 grey-level noise lies a median 0.036 away and a 1-pixel shift 0.13:
# it catches near-identical images, not merely similar digits. Checked by
# tests/unit/test_eval_evaluate.py::test_dup_threshold_calibration.
DUP_FRACTION = 0.04

METRIC_KEYS = (
    "fid",
    "kid_mean",
    "kid_std",
    "precision",
    "recall",
    "label_accuracy",
    "mean_pairwise_distance",
    "near_duplicate_rate",
    "memorization_rate",
    "median_nn_ratio",
)


def _check_images(images: Tensor | np.ndarray, what: str) -> Tensor:
    x = torch.as_tensor(images)
    if x.dtype != torch.uint8 or x.ndim != 4:
        raise InvalidArgumentError(
            f"{what} must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    return x


@contextmanager
def _timer(timings: dict[str, float], name: str) -> Iterator[None]:
    """Record the wall time of the block under `name`, in seconds."""
    t0 = time.perf_counter()
    yield
    timings[name] = round(time.perf_counter() - t0, 3)


def _resolve_classifier(
    labels, extractor: FeatureExtractor, classifier: Classifier | None
) -> Classifier | None:
    if labels is None:
        return None
    if classifier is None and isinstance(extractor, Classifier):
        classifier = extractor
    if classifier is None:
        raise InvalidArgumentError(
            "labels were given but the extractor has no logits(); pass classifier="
        )
    return classifier


def _against_reference(
    feats: np.ndarray, reference: ReferenceStats, settings: dict, timings: dict
) -> dict[str, float]:
    """FID, KID, precision/recall and diversity of generated features (N, D); fills `settings`."""
    n, seed = feats.shape[0], settings["seed"]
    out = {}
    with _timer(timings, "fid"):
        out["fid"] = fid_from_stats(*feature_stats(feats), reference.mu, reference.sigma)
    # KID and precision/recall compare equally many real and generated samples
    rng = np.random.default_rng(seed)
    n_real = min(n, reference.num_samples)
    real = reference.features[np.sort(rng.choice(reference.num_samples, n_real, replace=False))]
    # at most half of each set, so the subsets differ and kid_std measures their spread
    subset = max(2, min(settings["kid_subset_size"], n // 2, n_real // 2))
    with _timer(timings, "kid"):
        k = kid(real, feats, num_subsets=settings["kid_subsets"], subset_size=subset, seed=seed)
    out["kid_mean"], out["kid_std"] = k["mean"], k["std"]
    with _timer(timings, "precision_recall"):
        out |= precision_recall(real, feats, k=settings["pr_k"])
    threshold = settings["dup_fraction"] * reference.rms_pairwise_distance()
    with _timer(timings, "diversity"):
        out |= diversity(feats, dup_threshold=threshold)
    settings |= {"num_real_for_kid_pr": n_real, "kid_subset_size": subset}
    settings["dup_threshold"] = threshold
    return out


def evaluate_images(
    images: Tensor | np.ndarray,
    labels: Tensor | np.ndarray | None,
    extractor: FeatureExtractor,
    reference: ReferenceStats,
    train: ImageDataset | Tensor | np.ndarray | None = None,
    *,
    classifier: Classifier | None = None,
    seed: int = 0,
    kid_subsets: int = KID_DEFAULT_SUBSETS,
    kid_subset_size: int = KID_DEFAULT_SUBSET_SIZE,
    pr_k: int = PR_DEFAULT_K,
    dup_fraction: float = DUP_FRACTION,
    batch_size: int = 500,
) -> dict:
    """Compute every metric for one set of generated images.

    Args:
        images: generated images, uint8 (N, C, H, W); N must exceed the feature dimension (FID).
        labels: the class each image was requested with, int (N,), or None (unconditional):
            label accuracy is then None.
        extractor: feature extractor; must be the one `reference` was computed with.
        reference: real-data statistics (FID against its mean/covariance; KID and precision/
            recall against min(N, N_ref) of its features, drawn with `seed`).
        train: the full training set for memorization, an `ImageDataset` (its content hash is
            recorded) or uint8 images (M, C, H, W) (hashed without labels); None skips it.
        classifier: gives logits for label accuracy; default: the extractor, if it has `logits`.
        seed: seeds the reference subset and the KID subsets.
        kid_subsets, kid_subset_size: KID averaging; the subset size is capped at min(N, N_ref) / 2.
        pr_k: neighbourhood size of precision/recall.
        dup_fraction: near-duplicate threshold as a fraction of the reference RMS pairwise distance.
        batch_size: images per extractor call.

    Returns:
        {"num_samples", "metrics", "settings", "extractor", "classifier", "reference", "train",
        "timings_s"}; "metrics" has every key of METRIC_KEYS, None where not computed.
    """
    x = _check_images(images, "images")
    if extractor.sha256 != reference.extractor_sha256:
        raise InvalidArgumentError(
            f"reference {reference.name!r} was computed with extractor sha256 "
            f"{reference.extractor_sha256[:12]}..., not {extractor.sha256[:12]}...; recompute it"
        )
    check_fid_sample_count(x.shape[0], reference.feature_dim)
    clf = _resolve_classifier(labels, extractor, classifier)
    train_images = None if train is None else _check_images(_images_of(train), "train images")
    settings = {"seed": seed, "num_samples": int(x.shape[0]), "kid_subsets": kid_subsets}
    settings |= {"kid_subset_size": kid_subset_size, "pr_k": pr_k, "dup_fraction": dup_fraction}
    settings |= {"memorization_ratio": MEMORIZATION_RATIO, "memorization_space": "pixels"}
    timings: dict[str, float] = {}
    metrics: dict[str, float | None] = dict.fromkeys(METRIC_KEYS)

    with _timer(timings, "features"):
        feats = extract(extractor.features, x, batch_size=batch_size)  # (N, D) float64
    if feats.shape[1] != reference.feature_dim:
        raise InvalidArgumentError(
            f"extractor gives {feats.shape[1]}-d features, reference has {reference.feature_dim}"
        )
    metrics |= _against_reference(feats, reference, settings, timings)
    if clf is not None:
        with _timer(timings, "label_accuracy"):
            logits = extract(clf.logits, x, batch_size=batch_size)  # (N, num_classes)
            metrics["label_accuracy"] = label_accuracy(logits, labels)
    if train_images is not None:
        with _timer(timings, "memorization"):
            metrics |= memorization(x, train_images)
    return {
        "num_samples": int(x.shape[0]),
        "metrics": metrics,
        "settings": settings,
        "extractor": {"name": extractor.name, "sha256": extractor.sha256},
        "classifier": None if clf is None else {"name": clf.name, "sha256": clf.sha256},
        "reference": reference.describe(),
        "train": None if train is None else _describe_train(train),
        "timings_s": timings,
    }


def _images_of(train: ImageDataset | Tensor | np.ndarray) -> Tensor:
    return train.images if isinstance(train, ImageDataset) else torch.as_tensor(train)


def _describe_train(train: ImageDataset | Tensor | np.ndarray) -> dict:
    """Name, size and content hash of the training set (images + labels for an ImageDataset)."""
    if isinstance(train, ImageDataset):
        return {"name": train.name, "num_images": len(train), "content_hash": train.content_hash}
    images = torch.as_tensor(train)
    return {
        "name": None,
        "num_images": int(images.shape[0]),
        "content_hash": content_hash(images, None),
    }
