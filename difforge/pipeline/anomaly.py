"""Anomaly detection by reconstruction: how badly a model of normal data denoises a series.

A model trained on normal series only is asked to reconstruct each input from noisy copies of it.
For noise levels sigma_j (j = 1..L) and fixed noise draws eps_s (s = 1..S),

    e_j(x)   = 1/S sum_s mean_{c,t} ( D(x + sigma_j eps_s; sigma_j) - x )^2      (per-level error)
    score(x) = 1/L sum_j e_j(x) / m_j                                           (the anomaly score)

where D is the model's denoiser (one call, or a short Euler run from sigma_j down to 0 when
`steps` > 1) and m_j is the median of e_j over held-out *normal* validation series, so every level
weighs the same whatever its typical error. A series the model has not learned to produce is
pulled towards the normal data and so reconstructed far from itself. This is the DDPM
reconstruction score of Livernoche et al. 2023, "On Diffusion Modeling for Anomaly Detection"
(ICLR 2024, arXiv:2305.18593: their DDPM detector noises to a time t, denoises and scores the
reconstruction error, over several t), with the partial noising-then-denoising of Wolleb et al. 2022 ("Diffusion
Models for Medical Anomaly Detection", MICCAI) and AnoDDPM (Wyatt et al. 2022). Livernoche et al.
also derive a non-parametric diffusion-time estimator whose ranking equals k-NN's, which is why
k-NN is the baseline to beat.

eps_s is drawn from torch.Generator(seed_s) with shape (C, T) and shared by every series (common
random numbers): a series' score does not depend on the batch it is in, and differences between
series are not drowned by the noise draw. The decision threshold is the `quantile` of the scores
of the validation normals (a false-positive rate of 1 - quantile on normal data).

How well the scores rank anomalies is measured in `difforge.evaluation.anomaly` (ROC-AUC, PR-AUC).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.core.sigmas import karras_sigmas

DETECTOR_FILE = "anomaly.json"
DETECTOR_FORMAT = "difforge-anomaly/1"


class ScoreConfig(BaseModel):
    """How series are scored; stored in the detector's anomaly.json."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # noise levels sigma_j in data units (series are z-normalised: std 1 per series)
    sigmas: tuple[float, ...] = (0.1, 0.2, 0.4, 0.8)
    seeds: tuple[int, ...] = (0, 1, 2, 3)  # one shared noise draw eps_s per seed
    steps: int = Field(1, ge=1)  # 1: one denoiser call; k > 1: k Euler steps from sigma_j to 0
    batch_size: int = Field(256, ge=1)  # series per denoiser call (does not change the scores)

    @field_validator("sigmas")
    @classmethod
    def _positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or min(v) <= 0:
            raise ValueError(f"sigmas must be a non-empty list of positive levels, got {list(v)}")
        return v

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 0:
            raise ValueError(f"seeds must be a non-empty list of non-negative integers, got {v}")
        return v


def _reconstruct(denoiser, x: Tensor, sigma: float, steps: int) -> Tensor:
    """D(x; sigma) in one call, or an Euler run (Karras et al. 2022, Alg. 1) from sigma to 0."""
    if steps == 1:
        return denoiser(x, torch.full((x.shape[0],), sigma), None)
    from difforge.samplers import get_sampler

    sigmas = karras_sigmas(steps, min(0.002, sigma / 2), sigma)  # (steps + 1,), ends in 0
    return get_sampler("euler")(denoiser, x, sigmas)


@torch.no_grad()
def reconstruction_errors(denoiser, series: Tensor, config: ScoreConfig) -> Tensor:
    """Per-level errors e_j(x) (module docstring) of series (N, C, T): float64 (N, L).

    Args:
        denoiser: `denoiser(x, sigma, cond) -> x0_hat` (a loaded Model's `.denoiser`).
        series: float32 (N, C, T), normalised as the model's training data were.
        config: levels, seeds, steps and batch size.
    """
    if series.ndim != 3:
        raise InvalidArgumentError(f"series must be (N, C, T), got {tuple(series.shape)}")
    n, shape = series.shape[0], series.shape[1:]
    noises = [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in config.seeds]
    errors = torch.zeros(n, len(config.sigmas), dtype=torch.float64)
    for lo in range(0, n, config.batch_size):
        x = series[lo : lo + config.batch_size].float()  # (b, C, T)
        for j, sigma in enumerate(config.sigmas):
            for eps in noises:
                x_hat = _reconstruct(denoiser, x + sigma * eps[None], sigma, config.steps)
                errors[lo : lo + len(x), j] += (x_hat - x).double().square().mean(dim=(1, 2))
    return errors / len(config.seeds)


def level_scales(val_errors: Tensor) -> tuple[float, ...]:
    """m_j: the median per-level error of normal validation series (N, L), floored at 1e-12."""
    return tuple(float(m) for m in val_errors.median(dim=0).values.clamp(min=1e-12))


def combine(errors: Tensor, scales: Sequence[float]) -> Tensor:
    """score(x) = mean_j e_j(x) / m_j: (N, L) errors -> (N,) float64 scores."""
    m = torch.as_tensor(scales, dtype=torch.float64)
    if errors.ndim != 2 or errors.shape[1] != m.shape[0]:
        raise InvalidArgumentError(
            f"errors (N, {m.shape[0]}) expected for {m.shape[0]} levels, got {tuple(errors.shape)}"
        )
    return (errors.double() / m).mean(dim=1)


@dataclass(frozen=True)
class AnomalyDetector:
    """A model of normal series plus how to score and threshold (the detector folder's content).

    Folder layout: DIR/anomaly.json (this object, JSON) and DIR/model/ (a difforge model folder).
    """

    model: Any  # difforge.model.Model of the normal data
    score: ScoreConfig
    scales: tuple[float, ...]  # m_j per level, from the validation normals
    threshold: float  # scores above it are flagged
    quantile: float  # the validation-normal quantile the threshold sits at
    preprocess: dict[str, Any]  # {"length": T, "normalize": rule} applied to raw input series
    info: dict[str, Any]  # provenance: dataset hash, normal class, split sizes, val score stats

    def prepare(self, series: np.ndarray | Tensor) -> Tensor:
        """Raw series (N, T) or (N, C, T) -> float32 (N, C, T) resampled and normalised like the
        training data."""
        from difforge.data.timeseries import normalize_series, resample

        x = np.asarray(series, dtype=np.float64)
        if x.ndim == 2:
            x = x[:, None, :]
        c, length = self.model.image_shape
        if x.ndim != 3 or x.shape[1] != c:
            raise InvalidArgumentError(
                f"series must be (N, T) or (N, {c}, T) for this model, got {x.shape}"
            )
        if x.shape[-1] != length:
            x = resample(x, length)
        x = normalize_series(x, self.preprocess.get("normalize", "none"))
        return torch.from_numpy(x.astype(np.float32))

    def scores(self, series: np.ndarray | Tensor, *, prepared: bool = False) -> Tensor:
        """Anomaly scores (N,) float64 of raw series (or of `prepared` float32 (N, C, T))."""
        x = series if prepared else self.prepare(series)
        return combine(reconstruction_errors(self.model.denoiser, x, self.score), self.scales)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": DETECTOR_FORMAT,
            "score": self.score.model_dump(mode="json"),
            "scales": list(self.scales),
            "threshold": self.threshold,
            "quantile": self.quantile,
            "preprocess": self.preprocess,
            "model_sha256": self.model.sha256,
            "info": self.info,
        }

    def save(self, folder: str | Path) -> Path:
        """Write DIR/anomaly.json (the model folder DIR/model must already be there)."""
        path = Path(folder) / DETECTOR_FILE
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        return path


def load_detector(folder: str | Path) -> AnomalyDetector:
    """Load a detector folder (anomaly.json + model/); refuses a model whose weights changed."""
    from difforge.pipeline import ModelIntegrityError, load

    folder = Path(folder)
    path = folder / DETECTOR_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not an anomaly detector folder (no {DETECTOR_FILE})")
    d = json.loads(path.read_text())
    if d.get("format") != DETECTOR_FORMAT:
        raise InvalidArgumentError(f"{path}: format {d.get('format')!r}, need {DETECTOR_FORMAT!r}")
    model = load(folder / "model")
    if model.sha256 != d["model_sha256"]:
        raise ModelIntegrityError(
            f"{folder}/model weights (sha256 {model.sha256[:12]}...) are not the ones this "
            f"detector was calibrated on ({d['model_sha256'][:12]}...)"
        )
    return AnomalyDetector(
        model,
        ScoreConfig.model_validate(d["score"]),
        tuple(d["scales"]),
        float(d["threshold"]),
        float(d["quantile"]),
        dict(d["preprocess"]),
        dict(d["info"]),
    )
