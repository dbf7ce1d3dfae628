"""Fit an anomaly detector: train a 1-D diffusion model on normal series only, then calibrate the
reconstruction score (`difforge.evaluation.anomaly`) on held-out normal series.

The normal series are split once, by a seeded permutation, into a training part and a validation
part (`val_fraction`); the validation part never reaches the optimiser. It sets the per-level
scales m_j and the threshold (a quantile of the validation scores).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.data.timeseries import SeriesDataset
from difforge.pipeline.anomaly import (
    AnomalyDetector,
    ScoreConfig,
    combine,
    level_scales,
    reconstruction_errors,
)
from difforge.training.config import TrainConfig, parse_config
from difforge.training.loop import _info, train


class TrainingInterruptedError(DifforgeError):
    """The detector's training was stopped (SIGINT/SIGTERM) before it produced a model."""


def default_net(length: int, channels: int = 1) -> dict[str, Any]:
    """A small unet1d for series of `length` (divisible by 4): 2 halvings, attention at T/4."""
    if length % 4:
        raise InvalidArgumentError(f"series length {length} must be divisible by 4 (resample it)")
    return {
        "kind": "unet1d",
        "config": {
            "in_channels": channels,
            "out_channels": channels,
            "length": length,
            "base_channels": 32,
            "channel_mults": [1, 2, 2],
            "num_res_blocks": 1,
            "attention_resolutions": [length // 4],
            "norm_groups": 8,
        },
    }


def anomaly_train_config(
    dataset: SeriesDataset, steps: int, seed: int, overrides: Mapping[str, Any] | None = None
) -> TrainConfig:
    """The training recipe for a normal-data model: unconditional EDM, sigma_data 1 (z-normalised
    series), batch 16, lr 2e-3; `overrides` replaces any top-level field."""
    c, t = dataset.sample_shape
    base: dict[str, Any] = {
        "net": default_net(t, c),
        "dataset": {"derived_from": dataset.name},  # informational: the data are passed in
        "sigma_data": 1.0,
        "batch_size": min(16, len(dataset)),
        "max_steps": steps,
        "seed": seed,
        "log_every": max(1, min(50, steps)),
        "checkpoint_every": steps,
        "keep_last": 1,
        "cond_dropout": 0.0,
        "optim": {"lr": 2e-3, "warmup_steps": min(100, steps // 10)},
        "ema": {"halflife_images": 2000.0},
    }
    return parse_config({**base, **dict(overrides or {})}, "anomaly training config")


def split_normals(
    dataset: SeriesDataset, normal_class: int | None, val_fraction: float, seed: int
) -> tuple[SeriesDataset, SeriesDataset]:
    """(train, validation) normal series: class `normal_class` (all series when None), labels
    dropped so the model is unconditional; a seeded permutation decides the split."""
    if not 0 < val_fraction < 1:
        raise InvalidArgumentError(f"val_fraction must be in (0, 1), got {val_fraction}")
    idx = np.arange(len(dataset))
    if normal_class is not None:
        if dataset.labels is None or not 0 <= normal_class < dataset.num_classes:
            raise InvalidArgumentError(
                f"normal_class {normal_class} is not a class of {dataset.name} "
                f"({dataset.num_classes} classes)"
            )
        idx = idx[dataset.labels.numpy() == normal_class]
    idx = idx[np.random.default_rng(seed).permutation(len(idx))]
    n_val = max(1, round(val_fraction * len(idx)))
    if len(idx) - n_val < 2:
        raise InvalidArgumentError(f"only {len(idx)} normal series: too few to train and validate")
    unlabelled = SeriesDataset(dataset.name, dataset.series, None, 0, normalize=dataset.normalize)
    tag = f"{dataset.name}-normal{'' if normal_class is None else normal_class}"
    return (
        unlabelled.subset(np.sort(idx[n_val:]), f"{tag}-train"),
        unlabelled.subset(np.sort(idx[:n_val]), f"{tag}-val"),
    )


def calibrate(model, val: SeriesDataset, score: ScoreConfig, quantile: float):
    """(scales m_j, threshold, validation scores) from the validation normals."""
    if not 0 < quantile < 1:
        raise InvalidArgumentError(f"quantile must be in (0, 1), got {quantile}")
    errors = reconstruction_errors(model.denoiser, val.series, score)  # (N_val, L)
    scales = level_scales(errors)
    val_scores = combine(errors, scales)
    return scales, float(torch.quantile(val_scores, quantile)), val_scores


def fit_anomaly_detector(
    dataset: SeriesDataset,
    out: str | Path,
    *,
    normal_class: int | None = None,
    steps: int = 1500,
    seed: int = 0,
    val_fraction: float = 0.2,
    quantile: float = 0.95,
    score: ScoreConfig | None = None,
    train_overrides: Mapping[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = _info,
) -> AnomalyDetector:
    """Train on the normal series of `dataset`, calibrate, and write the detector folder `out`.

    Args:
        dataset: series (N, C, T), normalised (its `normalize` rule is recorded for scoring).
        out: the detector folder: run files, model/ and anomaly.json; must not hold a run yet.
        normal_class: the class taken as normal (None: every series is normal).
        steps: optimiser steps of the diffusion model.
        seed: training seed and the seed of the train/validation split.
        val_fraction: share of the normal series held out for calibration.
        quantile: the threshold is this quantile of the validation scores.
        score: the scoring recipe (levels, seeds, steps); default `ScoreConfig()`.
        train_overrides: top-level TrainConfig fields to replace (e.g. {"net": {...}}).

    Returns:
        The saved AnomalyDetector (load it again with `load_detector(out)`).
    """
    from difforge.pipeline import load

    score = score or ScoreConfig()
    train_set, val_set = split_normals(dataset, normal_class, val_fraction, seed)
    config = anomaly_train_config(train_set, steps, seed, train_overrides)
    out = Path(out)
    result = train(config, out, dataset=train_set, progress=progress, log=log)
    if result.model_dir is None:
        raise TrainingInterruptedError(
            f"training of the detector in {out} was interrupted at step {result.step}; "
            "nothing was calibrated"
        )
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # the model folder is what is kept
    model = load(result.model_dir)
    scales, threshold, val_scores = calibrate(model, val_set, score, quantile)
    info = _provenance(dataset, normal_class, (train_set, val_set), val_scores, result, seed)
    preprocess = {"length": dataset.sample_shape[-1], "normalize": dataset.normalize}
    detector = AnomalyDetector(model, score, scales, threshold, quantile, preprocess, info)
    detector.save(out)
    return detector


def _provenance(dataset, normal_class, splits, val_scores, result, seed) -> dict[str, Any]:
    """What anomaly.json records about the data and the training run behind a detector."""
    train_set, val_set = splits
    name = None
    if normal_class is not None:
        names = dataset.class_names
        name = names[normal_class] if normal_class < len(names) else str(normal_class)
    return {
        "dataset": dataset.name,
        "dataset_hash": dataset.content_hash,
        "normal_class": normal_class,
        "class_name": name,
        "train_size": len(train_set),
        "train_hash": train_set.content_hash,
        "val_size": len(val_set),
        "val_hash": val_set.content_hash,
        "val_score_median": float(val_scores.median()),
        "val_score_max": float(val_scores.max()),
        "steps": result.step,
        "final_loss": result.loss,
        "seed": seed,
    }
