"""Drift statistics: how far a window of served images and requests lies from a reference.

Pure functions over numpy arrays, shared math only: FID and KID are `difforge.evaluation.metrics`'
(scipy's `sqrtm`, the same code every evaluation report uses, so a drift FID and a report's FID are
on one scale under one extractor; tests/unit/test_eval_drift.py checks both against torchmetrics'
FrechetInceptionDistance / KernelInceptionDistance given the same features through a custom
`feature` module), the conditioning test is scipy's chi-square. The service's
monitor (difforge.serving.drift) feeds them; nothing here knows about requests or threads.

Window sizes matter and are reported beside every number:
  * FID needs more samples than feature dimensions (128 for the MNIST feature net), and is biased
    upwards at small n (Chong & Forsyth 2020), so a threshold holds for one window size only;
  * KID is unbiased at any n >= 2 (Binkowski et al. 2018), so it is the small-window signal;
  * the conditioning distance is the total variation 0.5 * sum |p - q| between the window's class
    histogram p and the reference's q (0: the same mix, 1: disjoint), with the chi-square
    goodness-of-fit p-value of the window's counts under q; for a text model the same over the
    prompts' word ids, against the word mix of the model's example prompts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.stats

from difforge.core.errors import InvalidArgumentError
from difforge.evaluation.features import FeatureExtractor
from difforge.evaluation.metrics import feature_stats, fid_from_stats, kid
from difforge.evaluation.reference import ReferenceStats, load_reference_file, reference_stats

KID_SUBSETS = 20  # subsets per comparison: enough to average, cheap at window sizes (~10 ms)
KID_MAX_SUBSET = 1000  # the evaluation default; windows smaller than that use the whole window
RESULT_KEYS = (
    "fid", "kid", "kid_std", "class_tv", "class_chi2_p", "prompt_tv", "prompt_chi2_p",
    "steps_mean", "guidance_mean",
)  # fmt: skip


@dataclass(frozen=True, eq=False)
class DriftReference:
    """What served traffic is compared with.

    stats: reference image features (N, D) with mean and covariance, under one extractor;
    class_probs: expected share of each class (num_classes + 1 bins: the last is the null class,
        i.e. unguided / unconditional requests); None for a model without a class key;
    steps, guidance: the settings the reference was measured at (the model's defaults, or the
        evaluation report's), summarised beside the window's;
    token_probs: for a text model, the expected share of each word id (vocab_size + 1 bins: the
        last is the null prompt), from the model's example prompts; None: not judged;
    source: where it came from, for the status route.
    """

    stats: ReferenceStats
    class_probs: np.ndarray | None
    steps: int | None
    guidance: float | None
    source: str
    token_probs: np.ndarray | None = None  # text models: see `prompt_token_probs`

    def describe(self) -> dict[str, Any]:
        probs = None if self.class_probs is None else [round(float(p), 6) for p in self.class_probs]
        return {
            "source": self.source,
            "reference": self.stats.describe(),
            "class_probs": probs,
            "steps": self.steps,
            "guidance": self.guidance,
            "prompt_tokens_judged": self.token_probs is not None,
        }


def class_distance(labels: Sequence[int], probs: np.ndarray) -> dict[str, float]:
    """Total variation and chi-square p-value of observed class `labels` against `probs`.

    Args:
        labels: one class index per served image, in [0, len(probs)).
        probs: expected class shares, summing to 1.

    Returns:
        {"tv": 0.5 * sum |p_window - probs|, "chi2_p": scipy.stats.chisquare p-value}; bins with
        zero expected share are left out of the chi-square (any count there makes p = 0).
    """
    q = np.asarray(probs, np.float64)
    lab = np.asarray(labels, np.int64)
    if lab.size == 0:
        raise InvalidArgumentError("class_distance needs at least one label")
    if lab.min() < 0 or lab.max() >= q.size:
        raise InvalidArgumentError(
            f"labels must lie in [0, {q.size}), got {lab.min()}..{lab.max()}"
        )
    counts = np.bincount(lab, minlength=q.size).astype(np.float64)
    tv = 0.5 * float(np.abs(counts / counts.sum() - q).sum())
    support = q > 0
    if (counts[~support] > 0).any():
        return {"tv": tv, "chi2_p": 0.0}
    if support.sum() < 2:
        return {"tv": tv, "chi2_p": 1.0}
    expected = q[support] * counts.sum()
    p = scipy.stats.chisquare(counts[support], expected).pvalue
    return {"tv": tv, "chi2_p": float(p)}


def window_drift(
    features: np.ndarray,
    reference: DriftReference,
    *,
    labels: Sequence[int] | None = None,
    tokens: Sequence[int] | None = None,
    steps: Sequence[int] = (),
    guidance: Sequence[float] = (),
    seed: int = 0,
) -> dict[str, Any]:
    """Distances of one window of served images (and their requests) from `reference`.

    Args:
        features: (n, D) features of the window's images under the reference's extractor.
        reference: the reference.
        labels: the class of each image (the null class for unconditional rows), or None.
        tokens: a text model's prompt word ids over the window, flat (`prompt_tokens`), or None.
        steps, guidance: per image, the request's settings.
        seed: seeds KID's subset draws (a fixed seed: the same window gives the same numbers).

    Returns:
        {"samples", "fid" (None while n <= D), "kid", "kid_std", "class_tv", "class_chi2_p",
         "prompt_tv", "prompt_chi2_p", "steps_mean", "guidance_mean"}; a None value was not
        computable for this window (or does not apply to the model).
    """
    f = np.asarray(features, np.float64)
    ref = reference.stats
    if f.ndim != 2 or f.shape[1] != ref.feature_dim:
        raise InvalidArgumentError(
            f"window features must be (n, {ref.feature_dim}), got {tuple(f.shape)}"
        )
    n = f.shape[0]
    out: dict[str, Any] = dict.fromkeys(RESULT_KEYS)
    out["samples"] = n
    if n > ref.feature_dim:
        out["fid"] = fid_from_stats(*feature_stats(f), ref.mu, ref.sigma)
    if n >= 2:
        size = min(n, ref.num_samples, KID_MAX_SUBSET)
        k = kid(ref.features, f, num_subsets=KID_SUBSETS, subset_size=size, seed=seed)
        out["kid"], out["kid_std"] = k["mean"], k["std"]
    if labels is not None and len(labels) and reference.class_probs is not None:
        d = class_distance(labels, reference.class_probs)
        out["class_tv"], out["class_chi2_p"] = d["tv"], d["chi2_p"]
    if tokens is not None and len(tokens) and reference.token_probs is not None:
        d = class_distance(tokens, reference.token_probs)
        out["prompt_tv"], out["prompt_chi2_p"] = d["tv"], d["chi2_p"]
    if len(steps):
        out["steps_mean"] = float(np.mean(steps))
    if len(guidance):
        out["guidance_mean"] = float(np.mean(guidance))
    return out


def uniform_classes(num_classes: int) -> np.ndarray:
    """The class mix of the spec's default (classes cycle) and of balanced evaluation: uniform
    over the classes, nothing on the null class."""
    probs = np.zeros(num_classes + 1)
    probs[:num_classes] = 1.0 / num_classes
    return probs


def prompt_tokens(ids: Sequence[int], vocab_size: int) -> list[int]:
    """The word ids of one encoded prompt ([CLS] and [PAD] dropped, [UNK] kept); the null prompt
    (no words) is the one extra bin `vocab_size`."""
    from difforge.data.tokenizer import CLS_ID, PAD_ID

    words = [int(i) for i in ids if int(i) not in (PAD_ID, CLS_ID)]
    return words or [vocab_size]


def prompt_token_probs(key) -> np.ndarray | None:
    """The word-id mix of a text key's example prompts (what a request without a prompt gets, cycled
    like classes): (vocab_size + 1,) shares; None when the key has no examples."""
    from difforge.data.tokenizer import tokenizer_from_json

    if not key.examples:
        return None
    tok = tokenizer_from_json(key.tokenizer)
    ids = [
        t
        for text in key.examples
        for t in prompt_tokens(tok.encode(text, key.max_tokens), tok.vocab_size)
    ]
    counts = np.bincount(ids, minlength=tok.vocab_size + 1).astype(np.float64)
    return counts / counts.sum()


def report_class_probs(report: Mapping[str, Any], num_classes: int) -> np.ndarray | None:
    """The class mix an evaluation report sampled: its repeats' label_counts, summed."""
    counts = np.zeros(num_classes + 1)
    for repeat in report.get("repeats") or []:
        c = repeat.get("label_counts") if isinstance(repeat, Mapping) else None
        if isinstance(c, list) and len(c) == num_classes:
            counts[:num_classes] += np.asarray(c, np.float64)
    return counts / counts.sum() if counts.sum() > 0 else None


def _mnist_split(name: str) -> str | None:
    split = name.removeprefix("mnist-")
    return split if name.startswith("mnist-") and split in ("train", "test") else None


def stats_from_report(
    report: Mapping[str, Any], extractor: FeatureExtractor, cache_dir: str | Path | None = None
) -> ReferenceStats:
    """The reference statistics an evaluation report was measured against, recomputed (or read
    from the reference cache) and checked against the report's dataset hash and extractor sha256.

    Only MNIST splits can be rebuilt from a name; for another data set pass the statistics file.
    """
    from difforge.data.mnist import load_mnist

    ref = report.get("reference")
    if not isinstance(ref, Mapping) or not isinstance(ref.get("name"), str):
        raise InvalidArgumentError("the evaluation report has no 'reference' section")
    split = _mnist_split(ref["name"])
    if split is None:
        raise InvalidArgumentError(
            f"the report's reference {ref['name']!r} is not an MNIST split; set drift.reference to "
            "its reference statistics file (.json beside .safetensors)"
        )
    if ref.get("extractor_sha256") not in (None, extractor.sha256):
        raise InvalidArgumentError(
            f"the report was measured with extractor {str(ref['extractor_sha256'])[:12]}, "
            f"the drift monitor runs {extractor.sha256[:12]}"
        )
    stats = reference_stats(load_mnist(split), extractor, cache_dir=cache_dir)
    if ref.get("dataset_hash") not in (None, stats.dataset_hash):
        raise InvalidArgumentError(
            f"the report's reference {ref['name']} has dataset hash {ref['dataset_hash']}, "
            f"the local copy {stats.dataset_hash}"
        )
    return stats


def load_drift_reference(
    path: str | Path | None,
    extractor: FeatureExtractor,
    *,
    num_classes: int,
    default_steps: int | None,
    default_guidance: float | None,
    default_split: str = "test",
    report: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
) -> DriftReference:
    """The reference of one served model version.

    Args:
        path: an evaluation report JSON (its "reference" section and label counts are used) or a
            reference statistics JSON (as `save_reference_stats` writes); None: `report` if
            given, else MNIST `default_split` (what `difforge evaluate` measures against).
        extractor: the feature network.
        num_classes: the model's classes (0: no class key).
        default_steps, default_guidance: the model's sampling defaults.
        report: the version's evaluation report (e.g. from the registry), used when path is None.
        cache_dir: the reference cache (default ~/.cache/difforge).
    """
    from difforge.data.mnist import load_mnist

    probs = uniform_classes(num_classes) if num_classes else None
    steps, guidance, source = default_steps, default_guidance, f"mnist-{default_split}"
    if path is not None:
        data = json.loads(Path(path).read_text())
        if isinstance(data, Mapping) and "tensors_file" in data:  # a reference statistics file
            stats = load_reference_file(path, extractor)
            return DriftReference(stats, probs, steps, guidance, str(path))
        report, source = data, str(path)
    if report is not None:
        stats = stats_from_report(report, extractor, cache_dir)
        if num_classes:
            probs = report_class_probs(report, num_classes)
            probs = uniform_classes(num_classes) if probs is None else probs
        sampler = report.get("sampler") if isinstance(report.get("sampler"), Mapping) else {}
        steps = sampler.get("steps", steps)
        guidance = sampler.get("guidance", guidance)
        source = source if path is not None else "evaluation report"
        return DriftReference(stats, probs, steps, guidance, source)
    stats = reference_stats(load_mnist(default_split), extractor, cache_dir=cache_dir)
    return DriftReference(stats, probs, steps, guidance, source)
