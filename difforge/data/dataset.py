"""In-memory datasets: decoded images or 2-D points, their labels, and a content hash of both."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.data.hashing import content_hash


class DatasetError(DifforgeError):
    """A dataset's files are missing, empty or unreadable; the message names the path."""


def _check_labels(labels: torch.Tensor | None, n: int, num_classes: int, name: str) -> None:
    if labels is None:
        if num_classes:
            raise InvalidArgumentError(f"{name}: num_classes={num_classes} but no labels")
        return
    if labels.dtype != torch.int64 or labels.shape != (n,):
        raise InvalidArgumentError(
            f"{name}: labels must be int64 of shape ({n},), got {labels.dtype} {tuple(labels.shape)}"
        )
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise InvalidArgumentError(f"{name}: labels must lie in [0, {num_classes})")


@dataclass(frozen=True)
class ImageDataset:
    """Decoded images and labels in memory.

    images: uint8 (N, C, H, W); labels: int64 (N,) in [0, num_classes) or None; num_classes: 0 if
    unlabelled; class_names: the name of each label, when known. content_hash covers the pixels
    and labels only (`difforge.data.hashing.content_hash`), so equal data hash equal whatever
    files they came from.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    content_hash: str = field(default="")
    class_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # No dtype check here: callers build float variants on purpose (e.g. to test that a
        # consumer refuses them); loaders in this package always produce uint8.
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.images, self.labels))

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One example's shape, (C, H, W)."""
        return tuple(self.images.shape[1:])

    def as_float(self) -> torch.Tensor:
        """Images as float32 in [-1, 1], shape (N, C, H, W)."""
        return self.images.float().div(127.5).sub(1.0)

    def fields(self) -> dict[str, torch.Tensor]:
        """Per-image data beside the pixels, {name: (N, ...)}; a conditioning spec reads them."""
        return {} if self.labels is None else {"labels": self.labels}


@dataclass(frozen=True)
class PointDataset:
    """Points of a toy 2-D distribution: float32 (N, D), optional int64 (N,) labels, content hash.

    labels say which component (mixture component, moon, ring) a point was drawn from.
    """

    name: str
    points: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    content_hash: str = field(default="")

    def __post_init__(self) -> None:
        if self.points.dtype != torch.float32 or self.points.ndim != 2:
            raise InvalidArgumentError(
                f"{self.name}: points must be float32 (N, D), got {self.points.dtype} "
                f"{tuple(self.points.shape)}"
            )
        _check_labels(self.labels, self.points.shape[0], self.num_classes, self.name)
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.points, self.labels))

    def __len__(self) -> int:
        return self.points.shape[0]

    def as_float(self) -> torch.Tensor:
        """The points, float32 (N, D)."""
        return self.points
