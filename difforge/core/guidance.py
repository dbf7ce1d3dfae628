"""Classifier-free guidance as a denoiser combinator (Ho & Salimans 2022, Eq. 6).

D_w(x, sigma) = D(x, sigma, uncond) + w * (D(x, sigma, cond) - D(x, sigma, uncond)), in the
diffusers convention: w = 1 is the plain conditional model, w = 0 the unconditional one. Guidance is
linear, so applying it to x0_hat equals applying it to eps_hat. Conditional and unconditional halves
go through the network in one batched forward.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser, repeat_level
from difforge.core.errors import InvalidArgumentError
from difforge.core.processes import append_dims


def _check_scale(scale: float | Tensor) -> Tensor:
    scale = torch.as_tensor(scale, dtype=torch.float32)
    if not torch.isfinite(scale).all():
        raise InvalidArgumentError(f"guidance scale must be finite, got {scale.tolist()}")
    return scale


def _cat_cond(cond: Mapping[str, Tensor], uncond: Mapping[str, Tensor]) -> dict[str, Tensor]:
    if set(cond) != set(uncond):
        raise InvalidArgumentError(
            f"cond and uncond must have the same keys, got {sorted(cond)} and {sorted(uncond)}"
        )
    return {k: torch.cat([cond[k], uncond[k]]) for k in cond}


class CFGDenoiser:
    """Guided denoiser over `denoiser`, for one sampling call.

    Args:
        denoiser: the conditional/unconditional denoiser (e.g. a net with a learned null class).
        scale: guidance scale w, a float or a (B,) tensor (one per sample).
        uncond: the unconditional cond for the whole batch (e.g. {"labels": null labels}).
        rescale: phi of guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and
            Sample Steps are Flawed", Eq. 15-16, applied to x0 as in their Alg. 2); 0 disables it.
        interval: (sigma_lo, sigma_hi]; guidance is applied only for sigma inside it (Kynkaanniemi
            et al. 2024, "Applying Guidance in a Limited Interval"), else w = 1 and no uncond forward.
    """

    def __init__(
        self,
        denoiser: Denoiser,
        scale: float | Tensor,
        uncond: Mapping[str, Tensor],
        *,
        rescale: float = 0.0,
        interval: tuple[float, float] = (0.0, math.inf),
    ):
        if not (0.0 <= rescale <= 1.0):
            raise InvalidArgumentError(f"guidance rescale must be in [0, 1], got {rescale}")
        lo, hi = interval
        if not (0.0 <= lo < hi):
            raise InvalidArgumentError(
                f"guidance interval must satisfy 0 <= lo < hi, got {interval}"
            )
        self.denoiser = denoiser
        self.scale = _check_scale(scale)
        self.uncond = uncond
        self.rescale = float(rescale)
        self.interval = (float(lo), float(hi))
        self._plain = bool((self.scale == 1).all()) and self.rescale == 0  # decided once, no sync

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        if cond is None:
            raise InvalidArgumentError("classifier-free guidance needs a cond")
        lo, hi = self.interval
        w = self.scale.to(x.device).expand(x.shape[0])
        active = (sigma > lo) & (sigma <= hi)
        w = torch.where(active, w, torch.ones_like(w))
        # Outside a guidance interval the unconditional half is skipped; deciding that reads sigma
        # (one host sync per step on a GPU), so it is only done when an interval is set.
        limited = lo > 0.0 or hi < math.inf
        if self._plain or (limited and not bool(active.any())):
            return self.denoiser(x, sigma, cond)
        both = self.denoiser(
            torch.cat([x, x]), repeat_level(sigma, 2), _cat_cond(cond, self.uncond)
        )
        x0_c, x0_u = both.chunk(2)
        w = append_dims(w, x.ndim)
        x0 = x0_u + w * (x0_c - x0_u)
        if self.rescale > 0:
            dims = tuple(range(1, x.ndim))
            ratio = x0_c.std(dim=dims, keepdim=True) / x0.std(dim=dims, keepdim=True).clamp(
                min=1e-12
            )
            x0 = self.rescale * (x0 * ratio) + (1 - self.rescale) * x0
        return x0
