"""Low-resolution views of an image dataset, for cascaded super-resolution (Ho et al. 2022).

One downsampling rule, `downsample`, is shared by the base model's training data, the
upsampler's conditioning inputs and the super-resolution benchmark, so a cascade's base draws
from the same distribution the upsampler was trained to refine.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from difforge.core.errors import InvalidArgumentError
from difforge.data.dataset import ImageDataset
from difforge.data.hashing import content_hash


def downsample(images: Tensor, factor: int) -> Tensor:
    """uint8 (N, C, H, W) -> uint8 (N, C, H / factor, W / factor): the mean of each factor x
    factor block (area averaging), rounded to the nearest integer."""
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise InvalidArgumentError(f"factor must be an integer >= 1, got {factor!r}")
    h, w = images.shape[-2:]
    if h % factor or w % factor:
        raise InvalidArgumentError(f"images {h}x{w} are not divisible by factor {factor}")
    if images.dtype != torch.uint8:
        raise InvalidArgumentError(f"images must be uint8, got {images.dtype}")
    mean = F.avg_pool2d(images.float(), factor)  # (N, C, H / f, W / f)
    return mean.round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class SuperResolutionDataset(ImageDataset):
    """Full-resolution images with their downsampled copies as the data field `low_res`.

    low_res: uint8 (N, C, H / factor, W / factor), what a `LowResKey` reads in training.
    """

    low_res: Tensor = field(default=None, repr=False)  # type: ignore[assignment]

    def fields(self) -> dict[str, Tensor]:
        return {**super().fields(), "low_res": self.low_res}


def _source(of: str | dict[str, Any]) -> ImageDataset:
    from difforge.data import load_dataset

    base = load_dataset(of)
    if not isinstance(base, ImageDataset):
        raise InvalidArgumentError(f"{of!r} is not an image dataset")
    return base


def load_downsampled(of: str | dict[str, Any] = "mnist:train", factor: int = 2) -> ImageDataset:
    """The images of dataset `of`, downsampled by `factor` (the base of a cascade trains here)."""
    base = _source(of)
    return ImageDataset(
        name=f"{base.name}-down{factor}",
        images=downsample(base.images, factor),
        labels=base.labels,
        num_classes=base.num_classes,
        class_names=base.class_names,
    )


def load_super_resolution(
    of: str | dict[str, Any] = "mnist:train", factor: int = 2
) -> SuperResolutionDataset:
    """The images of dataset `of` with their `downsample(images, factor)` as field `low_res`.

    Unlabelled: an upsampler reads the low-resolution image only, so it can upscale any image."""
    base = _source(of)
    return SuperResolutionDataset(
        name=f"{base.name}-sr{factor}",
        images=base.images,
        labels=None,
        num_classes=0,
        content_hash=content_hash(base.images, None),
        low_res=downsample(base.images, factor),
    )
