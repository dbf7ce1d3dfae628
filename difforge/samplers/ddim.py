"""DDIM (Song et al. 2021) and DDPM ancestral sampling (Ho et al. 2020): aliases of Euler ancestral.

Why they are aliases, not algorithms of their own. With alpha_bar = 1 / (1 + sigma^2) (VE space,
x = x_vp / sqrt(alpha_bar)), DDIM's update (Song et al. 2021, Eq. 12) divided by sqrt(alpha_bar_s) is

    x_s = x0_hat + sqrt(sigma_s^2 - c^2) eps_hat + c z,   eps_hat = (x_t - x0_hat) / sigma_t,
    c = sigma_eta / sqrt(alpha_bar_s),  sigma_eta = eta sqrt((1 - ab_s) / (1 - ab_t)) sqrt(1 - ab_t / ab_s)

(Eq. 16). Substituting ab = 1 / (1 + sigma^2) gives c^2 = eta^2 sigma_s^2 (sigma_t^2 - sigma_s^2) / sigma_t^2,
which is exactly Euler ancestral's sigma_up^2 (k-diffusion's `get_ancestral_step`), and
x0_hat + sigma_down eps_hat = x_t + (x_t - x0_hat) (sigma_down - sigma_t) / sigma_t is its Euler step
to sigma_down = sqrt(sigma_s^2 - sigma_up^2). So, on the same sigma grid with the same noise:

    ddim(eta)  = euler_ancestral(eta)        (eta = 0: no noise is drawn, the step is Euler's, bitwise)
    ddpm       = euler_ancestral(eta = 1)    (the posterior q(x_s | x_t, x0_hat), Ho et al. 2020, Eq. 6-7)

tests/unit/test_sampler_aliases.py checks the bitwise identities and compares against DDIM written
in VP space with the paper's symbols (agreement to float32 round-off).
"""

from __future__ import annotations

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.samplers.base import Callback
from difforge.samplers.euler import sample_euler_ancestral
from difforge.samplers.noise import NoiseSource


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
    """DDIM with stochasticity eta (0: deterministic, 1: DDPM) (Song et al. 2021, Eq. 12, 16);
    an alias of `sample_euler_ancestral(eta=eta)` (derivation in the module docstring)."""
    return sample_euler_ancestral(
        denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, eta=eta
    )


def sample_ddpm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
) -> Tensor:
    """DDPM ancestral sampling (Ho et al. 2020, Alg. 2, Eq. 6-7); an alias of
    `sample_euler_ancestral(eta=1)`."""
    return sample_euler_ancestral(
        denoiser, x, sigmas, cond=cond, noise=noise, callback=callback, eta=1.0
    )
