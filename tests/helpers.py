"""Closed-form denoisers and tiny networks shared by the test tiers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn


class GaussianMixture:
    """Isotropic Gaussian mixture in d dims with its exact denoiser E[x0 | x0 + sigma eps = x].

    For component k: x | k ~ N(m_k, (s_k^2 + sigma^2) I) and E[x0 | x, k] = m_k + s_k^2/(s_k^2+sigma^2)(x - m_k);
    the optimal denoiser averages these with posterior weights (Karras et al. 2022, Eq. 3 with a GMM).
    """

    def __init__(self, means: list[list[float]], stds: list[float], weights: list[float]):
        self.means = torch.tensor(means, dtype=torch.float64)  # (K, d)
        self.stds = torch.tensor(stds, dtype=torch.float64)  # (K,)
        self.weights = torch.tensor(weights, dtype=torch.float64)  # (K,)
        self.dim = self.means.shape[1]

    def __call__(self, x: Tensor, sigma: Tensor, cond=None) -> Tensor:
        xd = x.double().reshape(x.shape[0], 1, -1)  # (B, 1, d)
        var = self.stds.pow(2)[None, :] + sigma.double()[:, None].pow(2)  # (B, K)
        sq = (xd - self.means[None]).pow(2).sum(-1)  # (B, K)
        logp = self.weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * var.log()
        r = torch.softmax(logp, dim=1)  # (B, K)
        shrink = self.stds.pow(2)[None, :] / var  # (B, K)
        post = self.means[None] + shrink[..., None] * (xd - self.means[None])  # (B, K, d)
        return (r[..., None] * post).sum(1).reshape(x.shape).to(x.dtype)

    def component_of(self, x: Tensor) -> Tensor:
        return torch.cdist(x.double().reshape(x.shape[0], -1), self.means).argmin(1)

    def mean(self) -> Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def std_within(self, k: int) -> float:
        return float(self.stds[k])


class TinyEpsNet(nn.Module):
    """A small deterministic conv net (x, t, cond) -> eps-like output, for parity and contracts."""

    def __init__(self, channels: int = 1, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, channels, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        self.label = nn.Embedding(11, 8)
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g) * 0.3

    def forward(self, x: Tensor, t: Tensor, cond=None) -> Tensor:
        t_in = (t.float() / 1000).view(-1, 1).to(self.emb.weight.dtype)
        h = self.conv1(x) + self.emb(t_in)[:, :, None, None]
        if cond is not None and "labels" in cond:
            h = h + self.label(cond["labels"])[:, :, None, None]
        return torch.tanh(self.conv2(torch.tanh(h)))


def gaussian_stds_ok(sample_std: float, true_std: float, n: int, rel_discretization: float) -> bool:
    """Sample std within 4 standard errors (std / sqrt(2n)) plus a discretization allowance."""
    return (
        abs(sample_std - true_std)
        <= 4 * true_std / math.sqrt(2 * n) + rel_discretization * true_std
    )


# A tiny class-conditional U-Net spec (8x8x1, 3 classes) for training/artifact/CLI tests.
TINY_NET = {
    "kind": "unet",
    "config": {
        "in_channels": 1,
        "out_channels": 1,
        "image_size": 8,
        "base_channels": 8,
        "channel_mults": [1, 2],
        "num_res_blocks": 1,
        "attention_resolutions": [],
        "norm_groups": 4,
        "head_dim": 8,
        "num_classes": 3,
    },
}


def tamper_sqlite(path: str | Path, *statements: str) -> None:
    """Run SQL on a SQLite file directly, as an attacker with file access would (e.g. drop the
    append-only trigger, then edit rows)."""
    import sqlite3

    raw = sqlite3.connect(path)
    try:
        for sql in statements:
            raw.execute(sql)
        raw.commit()
    finally:
        raw.close()


REQUIRE_REAL = "DIFFORGE_REQUIRE_REAL"  # set to 1 by .ci/run: real components must be there


def skip_unless_real(reason: str) -> None:
    """Skip a test whose real component (Chromium, a PostgreSQL server) is missing, with a
    one-line reason; under DIFFORGE_REQUIRE_REAL=1 (CI) the missing component is a failure."""
    import os

    if os.environ.get(REQUIRE_REAL) == "1":
        pytest.fail(f"{REQUIRE_REAL}=1 but {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=True)
