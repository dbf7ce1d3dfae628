"""Ranking quality of anomaly scores: ROC-AUC and PR-AUC (average precision), pure functions.

The scores themselves come from `difforge.pipeline.anomaly` (reconstruction by a diffusion model
of normal data); anomalies are the positive class, ties count half.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from difforge.core.errors import InvalidArgumentError


def roc_auc(scores: Sequence[float] | np.ndarray, is_anomaly: Sequence[bool] | np.ndarray) -> float:
    """Area under the ROC curve: P(score of an anomaly > score of a normal), ties counting 1/2.

    The Mann-Whitney U statistic over average ranks (Hanley & McNeil 1982).
    """
    s, y = _check_scores(scores, is_anomaly)
    ranks = _average_ranks(s)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(
    scores: Sequence[float] | np.ndarray, is_anomaly: Sequence[bool] | np.ndarray
) -> float:
    """PR-AUC as average precision, sum_k (R_k - R_{k-1}) P_k over distinct score thresholds
    (the step-wise area scikit-learn's `average_precision_score` computes), anomalies positive."""
    s, y = _check_scores(scores, is_anomaly)
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision = tp / (last + 1)
    recall = tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _check_scores(scores, is_anomaly) -> tuple[np.ndarray, np.ndarray]:
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_anomaly, dtype=bool)
    if s.shape != y.shape or s.ndim != 1:
        raise InvalidArgumentError(f"scores {s.shape} and labels {y.shape} must be equal 1-D")
    if y.all() or not y.any():
        raise InvalidArgumentError("need at least one anomaly and one normal example")
    if not np.isfinite(s).all():
        raise InvalidArgumentError("scores must be finite")
    return s, y


def _average_ranks(s: np.ndarray) -> np.ndarray:
    """1-based ranks of s, tied values sharing their average rank."""
    from scipy.stats import rankdata

    return rankdata(s, method="average")
