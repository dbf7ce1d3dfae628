"""DPM-Solver++ in data prediction (Lu et al. 2022, "DPM-Solver++", Alg. 2), in VE space where
lambda = -log sigma. One history tensor lives in a local variable, never on an object."""

from __future__ import annotations

import math

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.samplers.base import (
    Callback,
    denoise,
    emit,
    per_grid,
    require_noise,
    sigma_list,
)
from difforge.samplers.noise import NoiseSource, upfront


def sample_dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M): multistep second order; first order on the first and the last step."""
    s = sigma_list(sigmas)
    old_denoised, h_last = None, None
    for i in range(len(s) - 1):
        denoised = denoise(denoiser, x, s[i], cond)
        if s[i + 1] == 0:
            x = denoised
        else:
            h = math.log(s[i]) - math.log(s[i + 1])  # lambda_next - lambda
            d = denoised
            if old_denoised is not None:
                r = h_last / h
                d = denoised * (1 + 1 / (2 * r)) - old_denoised * (1 / (2 * r))
            x = x * (s[i + 1] / s[i]) - d * math.expm1(-h)
            h_last = h
        old_denoised = denoised
        x = emit(callback, i, s, x, denoised)
    return x


def sde_sigma_up(sigma_next: float, eta_h: float, s_noise: float) -> float:
    """The noise an SDE-DPM-Solver++ step adds at sigma_next: sigma_next sqrt(1 - e^{-2 eta h})
    (Lu et al. 2022, DPM-Solver++ SDE; k-diffusion's dpmpp_2m_sde / 3m_sde), times s_noise."""
    return sigma_next * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise


@per_grid
def _sde_plan(s: tuple[float, ...], eta: float, s_noise: float) -> tuple:
    """dpmpp_2m_sde's scalars, a function of the grid alone: per step (the weight of x, of D, of
    D_old (None on the first step), the noise's sigma_up), or None on the step to 0. Made once per
    grid, not in every step's Python after the network call (the x0_hat terms folded into one
    weight each: one tensor op per term)."""
    plan, h_last = [], None
    for i in range(len(s) - 1):
        if s[i + 1] == 0:
            plan.append(None)
            continue
        h = math.log(s[i]) - math.log(s[i + 1])
        eta_h = eta * h
        phi = -math.expm1(-h - eta_h)
        c = 0.0 if h_last is None else 0.5 * phi / (h_last / h)  # of D - D_old
        up = sde_sigma_up(s[i + 1], eta_h, s_noise) if eta > 0 else 0.0
        plan.append(
            (s[i + 1] / s[i] * math.exp(-eta_h), phi + c, None if h_last is None else -c, up)
        )
        h_last = h
    return tuple(plan)


def sample_dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    eta: float = 1.0,
    s_noise: float = 1.0,
) -> Tensor:
    """SDE-DPM-Solver++(2M), midpoint form (Lu et al. 2022, App. / diffusers "sde-dpmsolver++")."""
    s = sigma_list(sigmas)
    if eta > 0:
        require_noise(noise, "dpmpp_2m_sde")
        noise = upfront(noise, x, sum(v > 0 for v in s[1:]))
    old_denoised = None
    for i, step in enumerate(_sde_plan(tuple(s), float(eta), float(s_noise))):
        denoised = denoise(denoiser, x, s[i], cond)
        if step is None:
            x = denoised
        else:
            scale, w, w_old, sigma_up = step
            x = (x * scale).add(denoised, alpha=w)
            if w_old is not None:
                x = x.add(old_denoised, alpha=w_old)
            if eta > 0:
                x = x.add(noise(x), alpha=sigma_up)
        old_denoised = denoised
        x = emit(callback, i, s, x, denoised)
    return x
