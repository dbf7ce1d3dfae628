"""The reconstruction anomaly score and its metrics, with an exact denoiser (no training)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.evaluation.anomaly import average_precision, roc_auc
from difforge.pipeline.anomaly import ScoreConfig, combine, level_scales, reconstruction_errors
from tests.helpers import GaussianMixture

T = 32


def _sine(periods: int, phase: float) -> np.ndarray:
    return np.sin(2 * math.pi * periods * np.arange(T) / T + phase)


@pytest.fixture(scope="module")
def normal_model():
    """Normal data: 1-period sines at 4 phases, std 0.1 around each; its exact denoiser."""
    means = [_sine(1, p).tolist() for p in (0.0, 1.5, 3.0, 4.5)]
    return GaussianMixture(means, [0.1] * 4, [0.25] * 4), np.asarray(means)


def _series(rng, means, n):
    k = rng.integers(0, len(means), n)
    return torch.tensor(means[k] + 0.1 * rng.standard_normal((n, T)), dtype=torch.float32)[:, None]


def test_score_separates_a_synthetic_anomaly(normal_model):
    gmm, means = normal_model
    rng = np.random.default_rng(0)
    val, normal = _series(rng, means, 40), _series(rng, means, 30)
    anomalies = torch.tensor(
        np.stack([_sine(3, p) for p in rng.uniform(0, 6, 10)]), dtype=torch.float32
    )[:, None]
    cfg = ScoreConfig()
    scales = level_scales(reconstruction_errors(gmm, val, cfg))
    s_norm = combine(reconstruction_errors(gmm, normal, cfg), scales)
    s_anom = combine(reconstruction_errors(gmm, anomalies, cfg), scales)
    assert s_anom.min() > s_norm.max()  # fully separated
    y = np.r_[np.zeros(30), np.ones(10)].astype(bool)
    scores = torch.cat([s_norm, s_anom]).numpy()
    assert roc_auc(scores, y) == 1.0 and average_precision(scores, y) == 1.0
    # normals score about 1 (each level is divided by its validation median)
    assert 0.5 < float(s_norm.median()) < 2.0


def test_scores_do_not_depend_on_the_batch(normal_model):
    gmm, means = normal_model
    x = _series(np.random.default_rng(1), means, 7)
    big = reconstruction_errors(gmm, x, ScoreConfig(batch_size=256))
    small = reconstruction_errors(gmm, x, ScoreConfig(batch_size=2))
    torch.testing.assert_close(big, small)
    alone = reconstruction_errors(gmm, x[3:4], ScoreConfig())
    torch.testing.assert_close(alone, big[3:4])


def test_multi_step_reconstruction_runs(normal_model):
    gmm, means = normal_model
    x = _series(np.random.default_rng(2), means, 4)
    e1 = reconstruction_errors(gmm, x, ScoreConfig(sigmas=(0.4,), seeds=(0,)))
    e4 = reconstruction_errors(gmm, x, ScoreConfig(sigmas=(0.4,), seeds=(0,), steps=4))
    assert e1.shape == e4.shape == (4, 1) and torch.isfinite(e4).all()
    assert not torch.allclose(e1, e4)


def test_score_config_refuses_bad_levels():
    with pytest.raises(ValueError, match="positive"):
        ScoreConfig(sigmas=(0.1, 0.0))
    with pytest.raises(ValueError, match="seeds"):
        ScoreConfig(seeds=())
    with pytest.raises(InvalidArgumentError, match="levels"):
        combine(torch.ones(3, 2), (1.0, 1.0, 1.0))


def test_roc_auc_and_average_precision_by_hand():
    y = np.array([0, 0, 1, 1], dtype=bool)
    assert roc_auc([0.1, 0.4, 0.35, 0.8], y) == 0.75
    assert roc_auc([1, 1, 1, 1], y) == 0.5  # ties count half
    # ranked: 0.8 (pos) 0.4 (neg) 0.35 (pos) 0.1 (neg): AP = (1 + 2/3) / 2
    assert average_precision([0.1, 0.4, 0.35, 0.8], y) == pytest.approx(5 / 6)
    with pytest.raises(InvalidArgumentError, match="one anomaly and one normal"):
        roc_auc([0.1, 0.2], [True, True])


def test_metrics_match_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(3)
    for _ in range(5):
        y = rng.random(60) < 0.3
        s = np.round(rng.standard_normal(60) + y, 1)  # rounded: plenty of ties
        assert roc_auc(s, y) == pytest.approx(metrics.roc_auc_score(y, s))
        assert average_precision(s, y) == pytest.approx(metrics.average_precision_score(y, s))
