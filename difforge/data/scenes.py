"""MNIST scenes: 64x64 canvases holding 1 to 4 real MNIST digits in a 2x2 layout.

Each scene is built from one split of MNIST only ("train" scenes from the train digits, "test"
scenes from the test digits; never mixed). Quadrant q in (0 top-left, 1 top-right, 2 bottom-left,
3 bottom-right) is either empty or holds one digit, rescaled by `scale` and placed at a jittered
position inside the 32x32 quadrant. Everything is a pure function of (split, n, seed): the same
arguments give the same bytes, and the content hash covers the pixels and the slot labels.

Per-digit metadata, stored beside each image (all (N, 4), one column per quadrant):
  slots      int64  class 0-9, or EMPTY (10) for an empty quadrant
  source     int64  index of the digit in its MNIST split (-1: empty)
  scale      float  digit side / 28
  center     float  (N, 4, 2) (row, col) of the digit's center on the canvas
  ink        float  ink mass of the placed digit, sum(pixels) / 255
  thickness  float  stroke thickness proxy: ink mass of the source digit / its ink bounding-box
                    height (ink per unit of stroke length, in px)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.dataset import ImageDataset
from difforge.data.hashing import content_hash
from difforge.data.mnist import SPLITS, load_mnist

SIZE = 64  # canvas side
QUAD = SIZE // 2  # quadrant side
SLOTS = 4  # quadrants, row-major
EMPTY = 10  # the slot token of an empty quadrant
SCALE_RANGE = (0.85, 1.1)  # digit side = round(28 * scale): 24..31 px, always inside a quadrant
DEFAULT_SIZES = {"train": 20000, "test": 2000}


@dataclass(frozen=True)
class SceneDataset(ImageDataset):
    """An ImageDataset of scenes (uint8 (N, 1, 64, 64), no flat labels) with per-slot metadata."""

    slots: torch.Tensor = field(default_factory=lambda: torch.zeros(0, SLOTS, dtype=torch.int64))
    meta: dict[str, torch.Tensor] = field(default_factory=dict)

    def fields(self) -> dict[str, torch.Tensor]:
        """{"slots": (N, 4) int64}: what a slot conditioning key reads."""
        return {"slots": self.slots}

    def metadata(self, i: int) -> list[dict[str, Any]]:
        """Scene i's digits, one dict per non-empty quadrant."""
        out = []
        for q in range(SLOTS):
            c = int(self.slots[i, q])
            if c == EMPTY:
                continue
            row, col = (float(v) for v in self.meta["center"][i, q])
            out.append(
                {
                    "class": c,
                    "quadrant": q,
                    "center": (row, col),
                    "scale": float(self.meta["scale"][i, q]),
                    "ink": float(self.meta["ink"][i, q]),
                    "thickness": float(self.meta["thickness"][i, q]),
                    "source": int(self.meta["source"][i, q]),
                }
            )
        return out


def _thickness(digits: np.ndarray) -> np.ndarray:
    """(M, 28, 28) uint8 -> (M,) ink mass / ink bounding-box height (px of stroke per row)."""
    ink = digits.reshape(len(digits), -1).sum(1) / 255.0
    rows = (digits > 0).any(2)  # (M, 28)
    height = np.where(rows.any(1), 28 - rows.argmax(1) - rows[:, ::-1].argmax(1), 1)
    return ink / np.maximum(height, 1)


def _layout(rng: np.random.Generator, n: int, pool: int):
    """Which quadrants are filled, which source digit, digit side and jitter: arrays of (n, 4)."""
    count = rng.integers(1, SLOTS + 1, size=n)  # digits per scene, uniform in 1..4
    order = np.argsort(rng.random((n, SLOTS)), axis=1)  # a random quadrant order per scene
    filled = np.zeros((n, SLOTS), dtype=bool)
    np.put_along_axis(filled, order, np.arange(SLOTS)[None, :] < count[:, None], axis=1)
    source = rng.integers(0, pool, size=(n, SLOTS))
    scale = rng.uniform(*SCALE_RANGE, size=(n, SLOTS))
    side = np.round(28 * scale).astype(np.int64)
    jitter = rng.random((n, SLOTS, 2))  # fraction of the free room, per axis
    offset = np.floor(jitter * (QUAD - side + 1)[..., None]).astype(np.int64)
    return filled, np.where(filled, source, -1), side, offset


def _paste(canvas: np.ndarray, digit: np.ndarray, side: int, top: int, left: int) -> float:
    """Resize a 28x28 digit to side x side (bilinear) and max-composite it; returns its ink."""
    x = torch.from_numpy(digit).float()[None, None]  # (1, 1, 28, 28)
    if side != 28:
        x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    patch = x[0, 0].round().clamp(0, 255).numpy().astype(np.uint8)  # (side, side)
    region = canvas[top : top + side, left : left + side]
    np.maximum(region, patch, out=region)
    return float(patch.sum()) / 255.0


@lru_cache(maxsize=4)
def load_scenes(split: str = "train", n: int | None = None, seed: int = 0) -> SceneDataset:
    """The deterministic MNIST-scenes dataset.

    Args:
        split: "train" (scenes of MNIST train digits) or "test" (of MNIST test digits).
        n: number of scenes; default 20000 for train, 2000 for test.
        seed: the layout seed; (split, n, seed) fixes every byte.

    Returns:
        SceneDataset with images uint8 (n, 1, 64, 64), slots (n, 4) and per-digit metadata.
    """
    check_choice("scenes split", split, SPLITS)
    n = DEFAULT_SIZES[split] if n is None else int(n)
    if n < 1:
        raise InvalidArgumentError(f"scenes n must be >= 1, got {n}")
    mnist = load_mnist(split)
    digits = mnist.images[:, 0].numpy()  # (M, 28, 28)
    classes = mnist.labels.numpy()
    # A split-specific stream: train and test scenes with the same seed share no randomness.
    rng = np.random.default_rng([seed, SPLITS.index(split), n])
    filled, source, side, offset = _layout(rng, n, len(digits))
    images = np.zeros((n, SIZE, SIZE), dtype=np.uint8)
    ink = np.zeros((n, SLOTS))
    center = np.zeros((n, SLOTS, 2))
    for i, q in zip(*np.nonzero(filled), strict=True):
        top = (q // 2) * QUAD + offset[i, q, 0]
        left = (q % 2) * QUAD + offset[i, q, 1]
        ink[i, q] = _paste(images[i], digits[source[i, q]], int(side[i, q]), top, left)
        center[i, q] = (top + side[i, q] / 2, left + side[i, q] / 2)
    slots = np.where(filled, classes[np.maximum(source, 0)], EMPTY).astype(np.int64)
    thick = np.where(filled, _thickness(digits)[np.maximum(source, 0)], 0.0)
    images_t = torch.from_numpy(images).unsqueeze(1)  # (n, 1, 64, 64)
    slots_t = torch.from_numpy(slots)
    meta = {
        "source": torch.from_numpy(source),
        "scale": torch.from_numpy(np.where(filled, side / 28.0, 0.0)).float(),
        "center": torch.from_numpy(center).float(),
        "ink": torch.from_numpy(ink).float(),
        "thickness": torch.from_numpy(thick).float(),
    }
    return SceneDataset(
        name=f"scenes-{split}",
        images=images_t,
        labels=None,
        num_classes=0,
        content_hash=content_hash(images_t, slots_t),
        slots=slots_t,
        meta=meta,
    )


def quadrants(images: torch.Tensor) -> torch.Tensor:
    """(B, C, 64, 64) -> (B, 4, C, 32, 32): the quadrants in slot order (row-major)."""
    b, c = images.shape[:2]
    q = images.reshape(b, c, 2, QUAD, 2, QUAD).permute(0, 2, 4, 1, 3, 5)  # (B, 2, 2, C, 32, 32)
    return q.reshape(b, SLOTS, c, QUAD, QUAD)


def slot_caption(slots: torch.Tensor | list[int | None]) -> str:
    """Four slot values as 'ab/cd' (top row / bottom row), '_' for an empty quadrant."""
    chars = ["_" if v is None or int(v) == EMPTY else str(int(v)) for v in list(slots)]
    return "".join(chars[:2]) + "/" + "".join(chars[2:])
