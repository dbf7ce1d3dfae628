"""Quality of generated series: a 1-D feature network trained here, and the metrics through it.

No standard pretrained extractor exists for UCR series, so `train_series_classifier` fits a small
1-D CNN classifier (three Conv1d-GroupNorm-SiLU layers, global average pooling) on a labelled
training set, deterministically from its seed on the CPU. Its pooled `feature_dim`-d layer
defines the feature space of the Frechet distance ("FD-series", the FID formula of Heusel et al.
2017 on these features); its logits give the label accuracy of class-conditional samples.
Memorization is measured on the raw values (Gu et al. 2023's NN1/NN2 < 1/3 rule,
`difforge.evaluation.metrics.memorization`). As with FID, numbers compare only under the same
extractor `sha256`, which every report records.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.data.timeseries import SeriesDataset
from difforge.evaluation.features import sha256_bytes
from difforge.evaluation.metrics import fid, label_accuracy, memorization


class SeriesFeatureNet(nn.Module):
    """(B, C, T) -> features (B, feature_dim) -> logits (B, num_classes)."""

    def __init__(self, in_channels: int, num_classes: int, feature_dim: int = 32, width: int = 32):
        super().__init__()
        self.feature_dim = feature_dim
        self.body = nn.Sequential(
            nn.Conv1d(in_channels, width, 7, padding=3),
            nn.GroupNorm(4, width),
            nn.SiLU(),
            nn.Conv1d(width, 2 * width, 5, padding=2, stride=2),
            nn.GroupNorm(4, 2 * width),
            nn.SiLU(),
            nn.Conv1d(2 * width, feature_dim, 3, padding=1, stride=2),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x).mean(dim=-1)  # (B, feature_dim): global average pooling over time

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.silu(self.features(x)))  # (B, num_classes)


@dataclass
class SeriesExtractor:
    """A trained `SeriesFeatureNet` behind the FeatureExtractor/Classifier protocols."""

    net: SeriesFeatureNet
    name: str
    sha256: str  # of the weights serialised as safetensors
    feature_dim: int

    @torch.no_grad()
    def features(self, x: Tensor) -> Tensor:
        return self.net.eval().features(x.float())

    @torch.no_grad()
    def logits(self, x: Tensor) -> Tensor:
        return self.net.eval()(x.float())


def train_series_classifier(
    dataset: SeriesDataset, *, steps: int = 400, seed: int = 0, lr: float = 3e-3, batch: int = 32
) -> SeriesExtractor:
    """Fit a SeriesFeatureNet to `dataset`'s labels with Adam (deterministic on the CPU).

    Small amplitude and time-shift jitter (x * U[0.9, 1.1], roll by up to T/16) keeps the
    features from keying on exact training values.
    """
    if dataset.labels is None or dataset.num_classes < 2:
        raise InvalidArgumentError(f"{dataset.name}: a feature net needs >= 2 labelled classes")
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = SeriesFeatureNet(dataset.sample_shape[0], dataset.num_classes)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    x_all, y_all = dataset.series, dataset.labels
    shift = max(1, dataset.sample_shape[-1] // 16)
    for _ in range(steps):
        idx = torch.randint(0, len(dataset), (min(batch, len(dataset)),), generator=g)
        x = x_all[idx] * (0.9 + 0.2 * torch.rand(len(idx), 1, 1, generator=g))
        x = torch.roll(x, int(torch.randint(-shift, shift + 1, (1,), generator=g)), dims=-1)
        loss = F.cross_entropy(net(x), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    weights = {k: v.contiguous() for k, v in net.state_dict().items()}
    name = f"difforge-series-features-{dataset.name}"
    return SeriesExtractor(
        net.eval(), name, sha256_bytes(safetensors_bytes(weights)), net.feature_dim
    )


def balanced_labels(num_classes: int, n: int) -> list[int]:
    """0, 1, ..., K-1, 0, 1, ... (n labels)."""
    return [i % num_classes for i in range(n)]


def evaluate_series(
    model,
    extractor: SeriesExtractor,
    reference: SeriesDataset,
    train: SeriesDataset,
    *,
    n: int = 200,
    seed: int = 0,
    sample_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Frechet distance to `reference`, label accuracy and memorization of n generated series.

    Args:
        model: a loaded class-conditional series Model (`difforge.load`).
        extractor: from `train_series_classifier` (trained on `train`).
        reference: held-out real series (e.g. the UCR TEST split) for the distance.
        train: the model's training series, for memorization.
        n: series to generate, labels balanced over the classes; seeds seed..seed+n-1.
        sample_kwargs: passed to `model.sample` (sampler, steps, guidance).

    Returns:
        A JSON-able dict with the metrics, the real-data floors (train vs reference distance,
        classifier accuracy on the reference) and what identifies them (extractor sha256, hashes).
    """
    labels = balanced_labels(model.num_classes, n) if model.num_classes else None
    s = model.sample(labels, n, seed=seed, **(sample_kwargs or {}))
    gen = s.images.float()  # (n, C, T)
    f_gen, f_ref = extractor.features(gen).numpy(), extractor.features(reference.series).numpy()
    out: dict[str, Any] = {
        "n": n,
        "fd_series": fid(f_gen, f_ref),
        "fd_series_floor_train_vs_reference": fid(extractor.features(train.series).numpy(), f_ref),
        "memorization": memorization(gen, train.series),
        "extractor": {"name": extractor.name, "sha256": extractor.sha256},
        "reference": {"name": reference.name, "hash": reference.content_hash, "n": len(reference)},
        "train_hash": train.content_hash,
        "sampler": s.sampler,
        "steps": s.steps,
        "guidance": s.guidance,
    }
    if labels is not None:
        out["label_accuracy"] = label_accuracy(extractor.logits(gen).numpy(), np.asarray(labels))
        out["classifier_accuracy_on_reference"] = label_accuracy(
            extractor.logits(reference.series).numpy(), reference.labels.numpy()
        )
    return out
