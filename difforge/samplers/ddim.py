"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020), written in VE space.

With alpha_bar = 1 / (1 + sigma^2), DDIM's update (Song et al. 2021, Eq. 12) divided by
sqrt(alpha_bar_s) becomes  x_s = x0 + sqrt(sigma_s^2 - c^2) eps_hat + c z,  c = sigma_eta / sqrt(alpha_bar_s),
sigma_eta = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)  (Eq. 16). eta = 1 is DDPM's
posterior q(x_s | x_t, x0) with variance beta_tilde (Ho et al. 2020, Eq. 6-7).
"""

from __future__ import annotations

import math

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.samplers.base import Callback, denoise, emit, require_noise, sigma_list
from difforge.samplers.noise import NoiseSource


def ddim_noise_level(sigma: float, sigma_next: float, eta: float) -> float:
    """c = sigma_eta / sqrt(alpha_bar_s): the std of fresh noise at sigma_next, in VE units."""
    if eta == 0 or sigma_next == 0:
        return 0.0
    ab_t, ab_s = 1 / (1 + sigma**2), 1 / (1 + sigma_next**2)
    sigma_eta = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))
    return min(sigma_next, sigma_eta / math.sqrt(ab_s))


def sample_ddim(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    eta: float = 0.0,
) -> Tensor:
    """DDIM with stochasticity eta (0: deterministic, 1: DDPM ancestral) (Song et al. 2021, Eq. 12)."""
    s = sigma_list(sigmas)
    if eta > 0:
        require_noise(noise, "ddim with eta > 0")
    for i in range(len(s) - 1):
        denoised = denoise(denoiser, x, s[i], cond)
        c = ddim_noise_level(s[i], s[i + 1], eta)
        eps = (x - denoised) / s[i]
        x = denoised + eps * math.sqrt(s[i + 1] ** 2 - c**2)
        if c > 0:
            x = x + noise(x) * c
        x = emit(callback, i, s, x, denoised)
    return x


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling: the posterior q(x_s | x_t, x0_hat) (Ho et al. 2020, Alg. 2, Eq. 6-7)."""
    return sample_ddim(denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, eta=1.0)
