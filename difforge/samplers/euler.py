"""Euler, Heun (Karras et al. 2022, Alg. 1 and 2) and Euler ancestral, over the probability-flow ODE
dx/dsigma = (x - D(x; sigma)) / sigma in VE space."""

from __future__ import annotations

import math

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.samplers.base import Callback, denoise, emit, require_noise, sigma_list
from difforge.samplers.noise import NoiseSource, upfront


def _churn(
    x: Tensor,
    sigma: float,
    n: int,
    s_churn: float,
    s_tmin: float,
    s_tmax: float,
    s_noise: float,
    noise,
) -> tuple[Tensor, float]:
    """Raise sigma to sigma_hat = (1 + gamma) sigma by adding noise (Karras et al. 2022, Alg. 2, l. 5-7)."""
    if s_churn <= 0 or not (s_tmin <= sigma <= s_tmax):
        return x, sigma
    gamma = min(s_churn / n, math.sqrt(2) - 1)
    sigma_hat = sigma * (1 + gamma)
    x = x + noise(x) * (s_noise * math.sqrt(sigma_hat**2 - sigma**2))
    return x, sigma_hat


def sample_euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Euler on the PF-ODE, with EDM's optional churn (Karras et al. 2022, Alg. 2 without Heun)."""
    s = sigma_list(sigmas)
    if s_churn > 0:
        require_noise(noise, "euler with s_churn > 0")
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        x = x + (x - denoised) * ((s[i + 1] - sigma_hat) / sigma_hat)
        x = emit(callback, i, s, x, denoised)
    return x


def sample_heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    s_churn: float = 0.0,
    s_tmin: float = 0.0,
    s_tmax: float = math.inf,
    s_noise: float = 1.0,
) -> Tensor:
    """Heun's 2nd-order method; Euler on the last step to sigma = 0 (Karras et al. 2022, Alg. 1/2)."""
    s = sigma_list(sigmas)
    if s_churn > 0:
        require_noise(noise, "heun with s_churn > 0")
    for i in range(len(s) - 1):
        x, sigma_hat = _churn(x, s[i], len(s) - 1, s_churn, s_tmin, s_tmax, s_noise, noise)
        denoised = denoise(denoiser, x, sigma_hat, cond)
        d = (x - denoised) / sigma_hat
        dt = s[i + 1] - sigma_hat
        x_next = x + d * dt
        if s[i + 1] > 0:
            d_next = (x_next - denoise(denoiser, x_next, s[i + 1], cond)) / s[i + 1]
            x_next = x + (d + d_next) * (dt / 2)
        x = x_next
        x = emit(callback, i, s, x, denoised)
    return x


def ancestral_step(sigma: float, sigma_next: float, eta: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = sigma_next^2; eta = 1 is DDPM-like."""
    if sigma_next == 0 or eta == 0:
        return sigma_next, 0.0
    sigma_up = min(
        sigma_next, eta * math.sqrt(sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2)
    )
    return math.sqrt(sigma_next**2 - sigma_up**2), sigma_up


def sample_euler_ancestral(
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
    """Euler step down to sigma_down, then fresh noise up to sigma_next (k-diffusion's ancestral)."""
    s = sigma_list(sigmas)
    noise = require_noise(noise, "euler_ancestral") if eta > 0 else noise
    steps = [ancestral_step(s[i], s[i + 1], eta) for i in range(len(s) - 1)]
    noise = upfront(noise, x, sum(up > 0 for _, up in steps))
    for i, (sigma_down, sigma_up) in enumerate(steps):
        denoised = denoise(denoiser, x, s[i], cond)
        x = x + (x - denoised) * ((sigma_down - s[i]) / s[i])
        if sigma_up > 0:
            x = x.add(noise(x), alpha=s_noise * sigma_up)  # one op: cache-cold at batch 1
        x = emit(callback, i, s, x, denoised)
    return x
