"""Toy 2-D distributions for fast, checkable experiments: seeded float32 (N, 2) point sets.

Each set is scaled to a per-coordinate spread of about 1. The Gaussian mixture has known
parameters, so its density and its exact denoiser E[x0 | x0 + sigma eps] are available in closed
form (`GaussianMixture.log_prob`, `GaussianMixture.denoise`) for testing samplers and metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.dataset import PointDataset

TOY_NAMES: tuple[str, ...] = ("gaussian_mixture", "moons", "checkerboard", "rings")


@dataclass(frozen=True)
class GaussianMixture:
    """Isotropic Gaussian mixture sum_k w_k N(mu_k, s_k^2 I) in D dimensions.

    means: (K, D); stds: (K,); weights: (K,), summing to 1.
    """

    means: tuple[tuple[float, ...], ...]
    stds: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        k = len(self.means)
        if k == 0 or len(self.stds) != k or len(self.weights) != k:
            raise InvalidArgumentError("means, stds and weights need the same non-zero length")
        if min(self.stds) <= 0 or min(self.weights) < 0 or abs(sum(self.weights) - 1) > 1e-6:
            raise InvalidArgumentError(
                "stds must be positive and weights non-negative, summing to 1"
            )

    def _params(self, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        mu = torch.tensor(self.means, dtype=torch.float64, device=device)  # (K, D)
        s2 = torch.tensor(self.stds, dtype=torch.float64, device=device) ** 2  # (K,)
        logw = torch.tensor(self.weights, dtype=torch.float64, device=device).log()  # (K,)
        return mu, s2, logw

    def _component_log_probs(self, x: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """log w_k + log N(x; mu_k, (s_k^2 + sigma^2) I): (B, K), plus mu and the variances (B, K)."""
        mu, s2, logw = self._params(x.device)
        var = s2[None] + sigma.double()[:, None] ** 2  # (B, K)
        d = x.shape[1]
        sq = (x.double()[:, None, :] - mu[None]).square().sum(-1)  # (B, K)
        logp = logw[None] - 0.5 * (sq / var + d * torch.log(2 * math.pi * var))  # (B, K)
        return logp, mu, var

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """log density of x (B, D) under the mixture convolved with N(0, sigma^2 I): (B,) float64."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64).expand(x.shape[0])
        logp, _, _ = self._component_log_probs(x, sigma)
        return torch.logsumexp(logp, dim=1)

    def denoise(self, x: Tensor, sigma: Tensor, cond: object = None) -> Tensor:
        """The exact denoiser E[x0 | x = x0 + sigma eps]: x (B, D), sigma (B,) -> (B, D) float32.

        Per component, E[x0 | x, k] = mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k); these are
        averaged with the posterior responsibilities p(k | x). Fits difforge's Denoiser contract.
        """
        logp, mu, var = self._component_log_probs(x, sigma)
        resp = torch.softmax(logp, dim=1)  # (B, K)
        s2 = torch.tensor(self.stds, dtype=torch.float64, device=x.device) ** 2  # (K,)
        gain = s2[None] / var  # (B, K)
        x0_k = mu[None] + gain[..., None] * (x.double()[:, None, :] - mu[None])  # (B, K, D)
        return (resp[..., None] * x0_k).sum(1).float()  # (B, D)

    def sample(self, n: int, seed: int) -> tuple[Tensor, Tensor]:
        """n points float32 (n, D) and their component indices int64 (n,), from numpy's PCG64(seed)."""
        rng = np.random.default_rng(seed)
        k = rng.choice(len(self.weights), size=n, p=np.asarray(self.weights))
        mu = np.asarray(self.means)[k]  # (n, D)
        pts = mu + np.asarray(self.stds)[k, None] * rng.standard_normal(mu.shape)
        return torch.from_numpy(pts.astype(np.float32)), torch.from_numpy(k.astype(np.int64))


def eight_gaussians(radius: float = 1.4, std: float = 0.1) -> GaussianMixture:
    """8 equal-weight components evenly spaced on a circle (per-coordinate std ~1 by default)."""
    angles = [2 * math.pi * i / 8 for i in range(8)]
    means = tuple((radius * math.cos(a), radius * math.sin(a)) for a in angles)
    return GaussianMixture(means=means, stds=(std,) * 8, weights=(1 / 8,) * 8)


def _moons(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved half circles (scikit-learn's make_moons, noise 0.1), centred."""
    label = rng.integers(0, 2, size=n)
    theta = rng.uniform(0.0, math.pi, size=n)
    x = np.where(label == 0, np.cos(theta), 1.0 - np.cos(theta))
    y = np.where(label == 0, np.sin(theta), 0.5 - np.sin(theta))
    pts = np.stack([x - 0.5, y - 0.25], axis=1) + 0.1 * rng.standard_normal((n, 2))
    return pts * 1.5, label


def _checkerboard(rng: np.random.Generator, n: int) -> tuple[np.ndarray, None]:
    """Uniform on the 8 dark cells of a 4x4 board over [-2, 2]^2 (as in FFJORD, Grathwohl et al. 2019)."""
    x = rng.uniform(-2.0, 2.0, size=n)
    y = rng.uniform(0.0, 1.0, size=n) + 2.0 * rng.integers(0, 2, size=n) - 2.0  # [-2,-1) or [0,1)
    y = y + (np.floor(x) % 2)  # shift every other column up by one cell
    return np.stack([x, y], axis=1), None


def _rings(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Four concentric circles of radii 0.5, 1, 1.5, 2, points spread by noise 0.04."""
    label = rng.integers(0, 4, size=n)
    radius = 0.5 * (label + 1)
    theta = rng.uniform(0.0, 2 * math.pi, size=n)
    pts = radius[:, None] * np.stack([np.cos(theta), np.sin(theta)], axis=1)
    return pts + 0.04 * rng.standard_normal((n, 2)), label


_SAMPLERS: dict[str, tuple[Callable, int]] = {
    "moons": (_moons, 2),
    "checkerboard": (_checkerboard, 0),
    "rings": (_rings, 4),
}


def load_toy(name: str, n: int = 10000, seed: int = 0) -> PointDataset:
    """n points of toy distribution `name`, float32 (n, 2), reproducible from `seed`.

    Args:
        name: one of TOY_NAMES; "gaussian_mixture" is `eight_gaussians()`.
        n: number of points.
        seed: seeds numpy's PCG64 generator; the same (name, n, seed) gives the same points.

    Returns:
        PointDataset with component labels (mixture component, moon, ring) where there are
        components, None for the checkerboard.
    """
    check_choice("toy dataset", name, TOY_NAMES)
    for what, value in (("n", n), ("seed", seed)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)
            or value < (1 if what == "n" else 0)
        ):
            raise InvalidArgumentError(
                f"{what} must be a {'positive' if what == 'n' else 'non-negative'} integer, got {value!r}"
            )
    if name == "gaussian_mixture":
        gmm = eight_gaussians()
        points, labels = gmm.sample(n, seed)
        return PointDataset(f"toy-{name}", points, labels, num_classes=len(gmm.weights))
    fn, num_classes = _SAMPLERS[name]
    pts, lab = fn(np.random.default_rng(seed), n)
    return PointDataset(
        f"toy-{name}",
        torch.from_numpy(pts.astype(np.float32)),
        None if lab is None else torch.from_numpy(lab.astype(np.int64)),
        num_classes=num_classes,
    )
