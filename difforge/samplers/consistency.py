"""Multistep consistency sampling (Song et al. 2023, "Consistency Models", Alg. 1): an alias of
Euler ancestral at full renoising.

Why it is an alias. Alg. 1 alternates x0 = f(x, tau_n) with x = x0 + sqrt(tau_{n+1}^2 - eps^2) z.
A difforge model's denoiser D(x; sigma) is EDM-preconditioned, whose boundary sits at sigma = 0
(c_skip(0) = 1, c_out(0) = 0: Karras et al. 2022, Table 1), so eps = 0 and a step is
x_next = D(x; sigma) + sigma_next z (the form LCM samplers use). Euler ancestral steps to
sigma_down, then adds sigma_up z with sigma_up = min(sigma_next, eta * sqrt(sigma_next^2 (sigma^2 -
sigma_next^2) / sigma^2)); at eta = inf, sigma_up = sigma_next and sigma_down = 0, and the Euler
step to sigma_down = 0 is x + (x - D) (0 - sigma) / sigma = D. So on the same grid with the same
noise

    consistency = euler_ancestral(eta = inf)

(tests/unit/test_sampler_aliases.py: bitwise, and against Alg. 1 written out). On a diffusion
model it is DDPM-like ancestral sampling that forgets x at every step; it is meant for consistency
students (difforge.training.distill, method "consistency"), whose D(x; sigma) maps any point of a
trajectory to its start.
"""

from __future__ import annotations

import math

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.samplers.base import Callback
from difforge.samplers.euler import sample_euler_ancestral
from difforge.samplers.noise import NoiseSource


def sample_consistency(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """Consistency models' multistep sampler (Song et al. 2023, Alg. 1, eps = 0); an alias of
    `sample_euler_ancestral(eta=inf)` (derivation in the module docstring). One step: D(x; sigma)."""
    return sample_euler_ancestral(
        denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, eta=math.inf
    )
