"""Properties of the metric functions on synthetic features (no network, no dataset)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial.distance import cdist, pdist

from difforge.core.errors import InvalidArgumentError
from difforge.evaluation.metrics import (
    diversity,
    feature_stats,
    fid,
    fid_from_stats,
    kid,
    knn_sq_dists,
    label_accuracy,
    memorization,
    precision_recall,
)

D = 8


def gaussian(n: int, seed: int, shift: float = 0.0, scale: float = 1.0, d: int = D) -> np.ndarray:
    return np.random.default_rng(seed).normal(shift, scale, size=(n, d))


def clusters(n_per: int, seed: int, classes=range(10), d: int = D) -> np.ndarray:
    """Well separated clusters, one per class: a stand-in for class-structured features."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1234).normal(0, 10, size=(10, d))
    return np.concatenate([centres[c] + rng.normal(0, 1, size=(n_per, d)) for c in classes])


# --- FID -----------------------------------------------------------------------------------------


def test_fid_matches_closed_form_for_isotropic_gaussians():
    # N(0, I) vs N(m, s^2 I): FID = |m|^2 + D (1 + s^2 - 2 s)
    m, s = np.full(D, 0.5), 2.0
    got = fid_from_stats(np.zeros(D), np.eye(D), m, s**2 * np.eye(D))
    assert got == pytest.approx(D * 0.25 + D * (1 + 4 - 4), rel=1e-9)


def test_fid_of_identical_stats_is_zero_and_symmetric():
    mu, sigma = feature_stats(gaussian(500, 0))
    mu2, sigma2 = feature_stats(gaussian(500, 1, shift=0.3))
    assert fid_from_stats(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert fid_from_stats(mu, sigma, mu2, sigma2) == pytest.approx(
        fid_from_stats(mu2, sigma2, mu, sigma), rel=1e-8
    )


def test_fid_invariant_to_sample_order():
    a, b = gaussian(400, 0), gaussian(300, 1, shift=0.2)
    perm = np.random.default_rng(5).permutation(len(a))
    assert fid(a[perm], b[::-1]) == pytest.approx(fid(a, b), rel=1e-9, abs=1e-12)


def test_fid_grows_with_shift():
    a = gaussian(500, 0)
    values = [fid(a, gaussian(500, 1, shift=s)) for s in (0.0, 0.5, 1.0)]
    assert values[0] < 0.2 < values[1] < values[2]


def test_fid_singular_covariance_uses_eps_fallback():
    sigma = np.zeros((D, D))
    sigma[0, 0] = 1.0  # rank one: sqrtm(S1 S2) is singular
    got = fid_from_stats(np.zeros(D), sigma, np.ones(D), sigma)
    assert np.isfinite(got)
    assert got == pytest.approx(D, abs=1e-3)


def test_fid_refuses_too_few_samples_and_bad_shapes():
    with pytest.raises(InvalidArgumentError, match="more samples than feature dimensions"):
        fid(gaussian(D, 0), gaussian(100, 1))
    with pytest.raises(InvalidArgumentError, match="dimensions differ"):
        fid(gaussian(100, 0), gaussian(100, 1, d=D + 1))
    with pytest.raises(InvalidArgumentError, match="2-D"):
        fid(np.zeros(100), gaussian(100, 1))
    bad = gaussian(100, 0)
    bad[3, 2] = np.nan
    with pytest.raises(InvalidArgumentError, match="NaN"):
        fid(bad, gaussian(100, 1))
    with pytest.raises(InvalidArgumentError, match="disagree"):
        fid_from_stats(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


# --- KID -----------------------------------------------------------------------------------------


def test_kid_near_zero_for_two_halves_and_large_for_a_shift():
    x = gaussian(1000, 0)
    same = kid(x[:500], x[500:], num_subsets=20, subset_size=200)
    shifted = kid(x[:500], gaussian(500, 1, shift=1.0), num_subsets=20, subset_size=200)
    assert abs(same["mean"]) < 0.02
    assert shifted["mean"] > 20 * max(abs(same["mean"]), same["std"] / 4)
    assert same["std"] >= 0


def test_kid_unbiased_estimator_matches_explicit_double_sum():
    x, y = gaussian(20, 0), gaussian(20, 1, shift=0.5)

    def k(a, b):
        return (a @ b / D + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    got = kid(x, y, num_subsets=1, subset_size=m)  # one subset of everything: a permutation
    assert got["mean"] == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    assert got["std"] == 0.0


def test_kid_is_seeded_and_validates_subset_size():
    x, y = gaussian(300, 0), gaussian(300, 1)
    assert kid(x, y, num_subsets=5, subset_size=100, seed=3) == kid(
        x, y, num_subsets=5, subset_size=100, seed=3
    )
    with pytest.raises(InvalidArgumentError, match="subset_size"):
        kid(x, y[:50], subset_size=100)


# --- nearest neighbours, precision / recall ------------------------------------------------------


@pytest.mark.parametrize("chunk", [7, 1024])
def test_knn_matches_brute_force(chunk):
    q, r = gaussian(50, 0), gaussian(40, 1)
    d, i = knn_sq_dists(q, r, 3, chunk=chunk)
    full = cdist(q, r, "sqeuclidean")
    np.testing.assert_allclose(d.numpy(), np.sort(full, 1)[:, :3], rtol=1e-9, atol=1e-9)
    np.testing.assert_array_equal(i.numpy(), np.argsort(full, 1)[:, :3])
    d_self, i_self = knn_sq_dists(q, q, 2, exclude_self=True, chunk=chunk)
    full_self = cdist(q, q, "sqeuclidean") + np.diag(np.full(len(q), np.inf))
    np.testing.assert_allclose(d_self.numpy(), np.sort(full_self, 1)[:, :2], rtol=1e-9, atol=1e-9)
    assert not (i_self.numpy() == np.arange(len(q))[:, None]).any()


def test_precision_recall_identical_sets_are_one():
    x = clusters(30, 0)
    assert precision_recall(x, x.copy(), chunk=64) == {"precision": 1.0, "recall": 1.0}


def test_recall_falls_when_a_class_is_missing_but_precision_does_not():
    real = clusters(40, 0)
    full = precision_recall(real, clusters(40, 1), chunk=64)
    missing = precision_recall(real, clusters(40, 1, classes=range(9)), chunk=64)
    assert missing["recall"] < full["recall"] - 0.05
    assert missing["recall"] <= 0.9 + 1e-9  # the missing class is 10% of the real set
    assert missing["precision"] > full["precision"] - 0.05


def test_precision_falls_for_off_manifold_samples():
    real, fake = clusters(40, 0), clusters(40, 1)
    fake[:100] += 100.0  # a quarter of the samples far from every real cluster
    assert precision_recall(real, fake)["precision"] <= 0.75 + 1e-9


# --- label accuracy, diversity, memorization -----------------------------------------------------


def test_label_accuracy_and_validation():
    logits = torch.eye(10)[[0, 1, 2, 3]]
    assert label_accuracy(logits, torch.tensor([0, 1, 2, 9])) == 0.75
    with pytest.raises(InvalidArgumentError, match="labels must be integers"):
        label_accuracy(logits, torch.tensor([0.0, 1.0, 2.0, 3.0]))
    with pytest.raises(InvalidArgumentError, match="lie in"):
        label_accuracy(logits, np.array([0, 1, 2, 10]))


def test_diversity_mean_distance_and_duplicates():
    x = gaussian(60, 0)
    got = diversity(x, dup_threshold=1e-3, chunk=16)
    assert got["mean_pairwise_distance"] == pytest.approx(pdist(x).mean(), rel=1e-9)
    assert got["near_duplicate_rate"] == 0.0
    collapsed = np.concatenate([x[:30], x[:30] + 1e-6])  # every sample has a twin
    assert diversity(collapsed, dup_threshold=1e-3)["near_duplicate_rate"] == 1.0


def test_memorization_flags_copies_not_fresh_samples():
    rng = np.random.default_rng(0)
    train = torch.from_numpy(rng.integers(0, 256, size=(300, 1, 6, 6), dtype=np.uint8))
    fresh = torch.from_numpy(rng.integers(0, 256, size=(20, 1, 6, 6), dtype=np.uint8))
    copies = train[[5, 17]].clone()
    copies[0, 0, 0, 0] ^= 1  # a near copy: one pixel off by one
    got = memorization(torch.cat([copies, fresh]), train, chunk=64)
    assert got["memorization_rate"] == pytest.approx(2 / 22)
    assert memorization(fresh, train)["memorization_rate"] == 0.0
    dup_train = torch.cat([train, train[:1]])  # an image present twice: ratio 0 / 0
    assert memorization(train[:1], dup_train)["memorization_rate"] == 1.0
