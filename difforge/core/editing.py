"""Editing combinators: inpainting by re-imposing the known pixels after every step.

RePaint (Lugmayr et al. 2022, Sec. 4.1 and Alg. 1), in VE space and the diffusers mask convention
(mask = 1 where the model generates, 0 where the image is kept):

    x_{i+1} = m * x_{i+1} + (1 - m) * (x_known + sigma_{i+1} eps),   eps ~ N(0, I) per sample,

so the kept region carries exactly the noise level the sampler is at, and at sigma_{i+1} = 0 it is
x_known to the byte. eps comes from a noise source of its own (for per-sample seeds,
`PerSampleNoise(seeds).stream(1)`), so re-imposition never shifts the sampler's draws, and each
sample's eps depends on its own seed only: batched or alone, the same bytes.

RePaint's resampling (jump length / resample count, Sec. 4.2) re-noises x back up and
repeats steps, which a step hook cannot do: it is `sample(..., resample=(jump_length,
jump_n_sample))` (difforge/samplers/repaint.py), with this hook as its step_hook.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError


class _Step(Protocol):
    """What the hook reads of a sampler's StepInfo (difforge.samplers.StepInfo)."""

    x: Tensor
    sigma_next: float


class _Noise(Protocol):
    def __call__(self, like: Tensor) -> Tensor: ...


def check_mask(mask: Tensor, x_known: Tensor) -> Tensor:
    """The mask as float32 with x_known's ndim, broadcastable to it, values in [0, 1].

    Args:
        mask: 1 = generate, 0 = keep (soft values blend); shape x_known's, or broadcastable to it
            with the same number of dims, e.g. (B, 1, H, W) or (1, 1, H, W) for (B, C, H, W).
        x_known: (B, *shape) the image whose kept region is imposed.
    """
    if not isinstance(mask, Tensor) or not isinstance(x_known, Tensor):
        raise InvalidArgumentError("mask and x_known must be tensors")
    if mask.ndim != x_known.ndim or any(
        m not in (1, k) for m, k in zip(mask.shape, x_known.shape, strict=True)
    ):
        raise InvalidArgumentError(
            f"mask of shape {tuple(mask.shape)} does not fit x_known of shape "
            f"{tuple(x_known.shape)}: give the same shape, or 1 on the dims to share"
        )
    if not mask.is_floating_point():  # bool or integer masks
        mask = mask.float()
    if not torch.isfinite(mask).all() or (mask < 0).any() or (mask > 1).any():
        raise InvalidArgumentError(
            "mask values must be in [0, 1] (1 = generate, 0 = keep), got "
            f"min {mask.min().item()}, max {mask.max().item()}"
        )
    if not torch.isfinite(x_known).all():
        raise InvalidArgumentError("x_known must be finite")
    return mask.to(torch.float32)


class Inpaint:
    """A step hook (`sample(..., step_hook=Inpaint(...))`) that re-imposes x_known where mask = 0.

    For one sampling call, as its noise source: the stream advances with every step, so a second
    call with the same hook would draw other noise. Build a new one per call.

    Args:
        x_known: (B, *shape) data-space images whose kept region stays.
        mask: 1 = generate, 0 = keep; see `check_mask` for the shapes allowed.
        noise: `noise(like) -> N(0, I)` of like's shape, a stream separate from the sampler's,
            e.g. `PerSampleNoise(seeds).stream(1)`.
    """

    def __init__(self, x_known: Tensor, mask: Tensor, noise: _Noise):
        self.mask = check_mask(mask, x_known)
        self.x_known = x_known.to(torch.float32)
        self.noise = noise

    def __call__(self, info: _Step) -> Tensor:
        x = info.x  # (B, *shape)
        if tuple(x.shape) != tuple(self.x_known.shape):
            raise InvalidArgumentError(
                f"inpainting x_known has shape {tuple(self.x_known.shape)}, the samples "
                f"{tuple(x.shape)}"
            )
        known = self.x_known.to(device=x.device, dtype=x.dtype)
        if info.sigma_next > 0:
            known = known + self.noise(known) * info.sigma_next  # the known part at sigma_next
        m = self.mask.to(device=x.device, dtype=x.dtype)
        return m * x + (1 - m) * known  # m = 0 gives `known` exactly, m = 1 gives x
