"""Sample-quality metrics as pure functions over feature (or pixel) arrays.

Every function takes numpy arrays or torch tensors of shape (N, D), computes in float64 unless a
docstring says otherwise, and returns plain Python floats (or dicts of them), so a report is JSON
as it stands. Nearest-neighbour searches are chunked: memory is O(chunk * chunk), never O(N * M).

Notation: real features x_1..x_n, generated features y_1..y_m, D = feature dimension.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import scipy.linalg
import torch
from torch import Tensor

from difforge.core.errors import DifforgeError, InvalidArgumentError

ArrayLike = np.ndarray | Tensor

KID_DEFAULT_SUBSETS = 100  # torch-fidelity's defaults, so KID values line up with its reports
KID_DEFAULT_SUBSET_SIZE = 1000
PR_DEFAULT_K = 3  # Kynkaanniemi et al. 2019 use k = 3 throughout their experiments
MEMORIZATION_RATIO = 1 / 3  # Gu et al. 2023: memorized iff l2(x, NN1) / l2(x, NN2) < 1/3
CHUNK = 1024  # rows of a distance block; a block is CHUNK x CHUNK float64 = 8 MiB


# --- input checks and nearest-neighbour machinery ----------------------------------------------


def as_matrix(a: ArrayLike, what: str, min_rows: int = 1) -> np.ndarray:
    """`a` as a finite float64 (N, D) numpy array; raises InvalidArgumentError otherwise."""
    arr = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    if arr.ndim != 2:
        raise InvalidArgumentError(f"{what} must be 2-D (N, D), got shape {arr.shape}")
    if arr.shape[0] < min_rows:
        raise InvalidArgumentError(f"{what} needs at least {min_rows} rows, got {arr.shape[0]}")
    arr = arr.astype(np.float64, copy=False)
    if not np.isfinite(arr).all():
        raise InvalidArgumentError(f"{what} contains NaN or infinite values")
    return arr


def _same_dim(a: np.ndarray, b: np.ndarray, what: str) -> None:
    if a.shape[1] != b.shape[1]:
        raise InvalidArgumentError(
            f"{what}: feature dimensions differ ({a.shape[1]} vs {b.shape[1]})"
        )


def _blocks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(start + chunk, n)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """Squared L2 distances (A, B) = |a|^2 + |b|^2 - 2 a.b, clamped at 0 against rounding."""
    d = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1)[None] - 2 * a @ b.T
    return d.clamp_(min=0)


def knn_sq_dists(
    query: ArrayLike,
    ref: ArrayLike,
    k: int,
    *,
    exclude_self: bool = False,
    chunk: int = CHUNK,
    dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, Tensor]:
    """The k smallest squared L2 distances from each query row to the rows of `ref`.

    Args:
        query: (Q, D). ref: (R, D); may be uint8 (cast per block, so it is never copied whole).
        k: neighbours per query, 1 <= k <= R (R - 1 with exclude_self).
        exclude_self: `query` is `ref`; row i never counts as its own neighbour.
        chunk: rows per block on both sides; peak memory ~ chunk * (chunk + k) values.
        dtype: compute dtype of the distance blocks.

    Returns:
        (dists (Q, k), indices (Q, k)), ascending by distance.
    """
    q_all, r_all = torch.as_tensor(query), torch.as_tensor(ref)
    n_ref = r_all.shape[0] - int(exclude_self)
    if not 1 <= k <= n_ref:
        raise InvalidArgumentError(f"need 1 <= k <= {n_ref} reference rows, got k={k}")
    out_d, out_i = [], []
    for qs, qe in _blocks(q_all.shape[0], chunk):
        q = q_all[qs:qe].to(dtype)
        best_d = torch.full((qe - qs, k), float("inf"), dtype=dtype)
        best_i = torch.zeros((qe - qs, k), dtype=torch.int64)
        for rs, re in _blocks(r_all.shape[0], chunk):
            d = _sq_dists(q, r_all[rs:re].to(dtype))  # (q, r)
            if exclude_self and rs < qe and qs < re:
                rows = torch.arange(max(qs, rs), min(qe, re))
                d[rows - qs, rows - rs] = float("inf")
            idx = torch.arange(rs, re).expand(qe - qs, -1)
            best_d, order = torch.cat([best_d, d], 1).topk(k, dim=1, largest=False)
            best_i = torch.cat([best_i, idx], 1).gather(1, order)
        out_d.append(best_d)
        out_i.append(best_i)
    return torch.cat(out_d), torch.cat(out_i)


# --- FID ------------------------------------------------------------------------------------------


def feature_stats(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of features (N, D), float64."""
    f = as_matrix(features, "features", min_rows=2)
    return f.mean(0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def fid_from_stats(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Frechet distance ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 sqrtm(S1 S2)) (Heusel et al. 2017, Eq. 6).

    When S1 S2 is singular (scipy warns, or returns non-finite values), eps * I is added to both
    covariances, as the reference TTUR / pytorch-fid code does. Imaginary parts below 1e-3
    on the diagonal are rounding noise and dropped; larger ones raise DifforgeError.
    """
    mu1, mu2 = (np.atleast_1d(np.asarray(m, np.float64)) for m in (mu1, mu2))
    s1, s2 = (np.atleast_2d(np.asarray(s, np.float64)) for s in (sigma1, sigma2))
    d = mu1.shape[0]
    if mu1.shape != mu2.shape or s1.shape != (d, d) or s2.shape != (d, d):
        raise InvalidArgumentError(
            f"FID statistics disagree: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}"
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(s1 @ s2)
    singular = any(issubclass(w.category, scipy.linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = scipy.linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        max_imag = np.abs(np.diagonal(covmean).imag).max()
        if max_imag > 1e-3:
            raise DifforgeError(f"FID: sqrtm(S1 S2) has imaginary component {max_imag:.3g}")
        covmean = covmean.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def fid(features1: ArrayLike, features2: ArrayLike) -> float:
    """FID between two feature sets (Heusel et al. 2017, Eq. 6); each needs N > D rows.

    With N <= D the sample covariance is rank deficient and the FID mostly measures that, so it is
    refused instead of reported.
    """
    f1, f2 = as_matrix(features1, "features1"), as_matrix(features2, "features2")
    _same_dim(f1, f2, "FID")
    check_fid_sample_count(f1.shape[0], f1.shape[1])
    check_fid_sample_count(f2.shape[0], f2.shape[1])
    return fid_from_stats(*feature_stats(f1), *feature_stats(f2))


def check_fid_sample_count(n: int, dim: int) -> None:
    """FID needs more samples than feature dimensions (a full-rank covariance)."""
    if n <= dim:
        raise InvalidArgumentError(
            f"FID needs more samples than feature dimensions (full-rank covariance): "
            f"got {n} samples of {dim}-d features; use at least {dim + 1}"
        )


# --- KID ------------------------------------------------------------------------------------------


def _polynomial_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 (Gretton et al. 2012, Lemma 6) with k(a, b) = (a.b / d + 1)^3."""
    m, d = x.shape
    k_xx = (x @ x.T / d + 1) ** 3
    k_yy = (y @ y.T / d + 1) ** 3
    k_xy = (x @ y.T / d + 1) ** 3
    off_diag = (k_xx.sum() - np.trace(k_xx) + k_yy.sum() - np.trace(k_yy)) / (m * (m - 1))
    return float(off_diag - 2 * k_xy.mean())


def kid(
    real: ArrayLike,
    fake: ArrayLike,
    *,
    num_subsets: int = KID_DEFAULT_SUBSETS,
    subset_size: int = KID_DEFAULT_SUBSET_SIZE,
    seed: int = 0,
) -> dict[str, float]:
    """KID: unbiased polynomial-kernel MMD^2 averaged over subsets (Binkowski et al. 2018, Sec. 4).

    Args:
        real, fake: features (N, D) and (M, D).
        num_subsets: subsets drawn from each set.
        subset_size: rows per subset, drawn without replacement; must be <= min(N, M).
        seed: seeds the subset draws.

    Returns:
        {"mean": ..., "std": ...} of MMD^2 over the subsets (an unbiased estimate: may be < 0).
    """
    x, y = as_matrix(real, "real features"), as_matrix(fake, "fake features")
    _same_dim(x, y, "KID")
    if num_subsets < 1:
        raise InvalidArgumentError(f"num_subsets must be >= 1, got {num_subsets}")
    if not 2 <= subset_size <= min(len(x), len(y)):
        raise InvalidArgumentError(
            f"KID subset_size must be in [2, min(N, M) = {min(len(x), len(y))}], got {subset_size}"
        )
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            _polynomial_mmd2(
                x[rng.choice(len(x), subset_size, replace=False)],
                y[rng.choice(len(y), subset_size, replace=False)],
            )
            for _ in range(num_subsets)
        ]
    )
    return {"mean": float(values.mean()), "std": float(values.std())}


# --- precision / recall ---------------------------------------------------------------------------


def knn_radii(features: ArrayLike, k: int = PR_DEFAULT_K, chunk: int = CHUNK) -> Tensor:
    """Distance from each row to its k-th nearest other row, (N,) float64 (Kynkaanniemi Eq. 1)."""
    f = torch.from_numpy(as_matrix(features, "features", min_rows=k + 1))
    d, _ = knn_sq_dists(f, f, k, exclude_self=True, chunk=chunk)
    return d[:, -1].sqrt()


def _coverage(query: Tensor, ref: Tensor, ref_radii: Tensor, chunk: int) -> float:
    """Fraction of query rows inside at least one ball B(ref_j, radius_j) (Kynkaanniemi Eq. 1)."""
    inside = torch.zeros(query.shape[0], dtype=torch.bool)
    for qs, qe in _blocks(query.shape[0], chunk):
        for rs, re in _blocks(ref.shape[0], chunk):
            d = _sq_dists(query[qs:qe], ref[rs:re]).sqrt_()  # (q, r)
            inside[qs:qe] |= (d <= ref_radii[rs:re][None]).any(1)
    return float(inside.double().mean())


def precision_recall(
    real: ArrayLike, fake: ArrayLike, *, k: int = PR_DEFAULT_K, chunk: int = CHUNK
) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019, Eq. 1-2, k-NN manifolds).

    Precision: fraction of fake samples inside the real manifold (union of real k-NN balls);
    recall: fraction of real samples inside the fake manifold. Use equally many real and fake rows.

    Returns:
        {"precision": ..., "recall": ...}, each in [0, 1].
    """
    x = torch.from_numpy(as_matrix(real, "real features", min_rows=k + 1))
    y = torch.from_numpy(as_matrix(fake, "fake features", min_rows=k + 1))
    _same_dim(x.numpy(), y.numpy(), "precision/recall")
    precision = _coverage(y, x, knn_radii(x, k, chunk), chunk)
    recall = _coverage(x, y, knn_radii(y, k, chunk), chunk)
    return {"precision": precision, "recall": recall}


# --- label accuracy, diversity, memorization ------------------------------------------------------


def label_accuracy(logits: ArrayLike, labels: ArrayLike) -> float:
    """Fraction of samples whose classifier argmax equals the label they were requested with."""
    lg = as_matrix(logits, "logits")
    lab = labels.detach().cpu().numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    if lab.shape != (lg.shape[0],) or not np.issubdtype(lab.dtype, np.integer):
        raise InvalidArgumentError(
            f"labels must be integers of shape ({lg.shape[0]},), got {lab.dtype} {lab.shape}"
        )
    if lab.min() < 0 or lab.max() >= lg.shape[1]:
        raise InvalidArgumentError(
            f"labels must lie in [0, {lg.shape[1]}), got {lab.min()}..{lab.max()}"
        )
    return float((lg.argmax(1) == lab).mean())


def diversity(features: ArrayLike, *, dup_threshold: float, chunk: int = CHUNK) -> dict[str, float]:
    """Mean pairwise L2 feature distance, and the near-duplicate rate.

    A sample is a near duplicate when its nearest *other* sample lies closer than `dup_threshold`
    in feature space. `evaluate_images` sets the threshold to DUP_FRACTION times the reference
    set's RMS pairwise distance (see difforge.evaluation.evaluate), so it scales with the extractor.

    Returns:
        {"mean_pairwise_distance": ..., "near_duplicate_rate": ...}
    """
    f = torch.from_numpy(as_matrix(features, "features", min_rows=2))
    if not dup_threshold >= 0:
        raise InvalidArgumentError(f"dup_threshold must be >= 0, got {dup_threshold}")
    n, total = f.shape[0], 0.0
    for qs, qe in _blocks(n, chunk):
        for rs, re in _blocks(n, chunk):
            d = _sq_dists(f[qs:qe], f[rs:re]).sqrt_()
            if rs < qe and qs < re:  # the diagonal: rounding can leave sqrt(tiny) > 0
                rows = torch.arange(max(qs, rs), min(qe, re))
                d[rows - qs, rows - rs] = 0.0
            total += float(d.sum())
    nn_d, _ = knn_sq_dists(f, f, 1, exclude_self=True, chunk=chunk)
    dup_rate = float((nn_d[:, 0].sqrt() < dup_threshold).double().mean())
    return {"mean_pairwise_distance": total / (n * (n - 1)), "near_duplicate_rate": dup_rate}


def nn_ratios(samples: ArrayLike, train: ArrayLike, *, chunk: int = CHUNK) -> Tensor:
    """Per sample l2(x, NN1(x)) / l2(x, NN2(x)) over the training images, in pixel space, (N,).

    Args:
        samples: (N, ...) images, uint8 or float, in the same value range as `train`.
        train: (M, ...) images, M >= 2; uint8 stays uint8 and is cast one block at a time.
        chunk: rows per distance block (memory ~ chunk^2 float32 + chunk rows of pixels).

    Returns:
        float64 (N,); 0 for a sample equal to a training image that the training set holds
        twice (0 / 0), so exact copies always count as memorized.
    """
    q, t = _flat_pixels(samples, "samples"), _flat_pixels(train, "train", min_rows=2)
    if q.shape[1] != t.shape[1]:
        raise InvalidArgumentError(f"samples have {q.shape[1]} pixels, train images {t.shape[1]}")
    # float32 blocks find the two neighbours; their distances are then recomputed exactly
    _, idx = knn_sq_dists(q, t, 2, chunk=chunk, dtype=torch.float32)  # (N, 2)
    q64 = q.double()
    d1 = (q64 - t[idx[:, 0]].double()).norm(dim=1)
    d2 = (q64 - t[idx[:, 1]].double()).norm(dim=1)
    d1, d2 = torch.minimum(d1, d2), torch.maximum(d1, d2)
    return torch.where(d1 == 0, torch.zeros_like(d1), d1 / d2.clamp(min=1e-12))


def memorization(
    samples: ArrayLike, train: ArrayLike, *, ratio: float = MEMORIZATION_RATIO, chunk: int = CHUNK
) -> dict[str, float]:
    """Fraction of samples whose nearest training image is far closer than the second nearest.

    Gu et al. 2023, "On Memorization in Diffusion Models": memorized iff
    l2(x, NN1(x)) / l2(x, NN2(x)) < 1/3, in pixel space, against the whole training set.
    See `nn_ratios` for the arguments.

    Returns:
        {"memorization_rate": ..., "median_nn_ratio": ...}
    """
    r = nn_ratios(samples, train, chunk=chunk)
    return {
        "memorization_rate": float((r < ratio).double().mean()),
        "median_nn_ratio": float(r.median()),
    }


def _flat_pixels(images: ArrayLike, what: str, min_rows: int = 1) -> Tensor:
    x = torch.as_tensor(images)
    if x.ndim < 2 or x.shape[0] < min_rows:
        raise InvalidArgumentError(
            f"{what} must be (N, ...) with N >= {min_rows}, got {tuple(x.shape)}"
        )
    return x.reshape(x.shape[0], -1)
