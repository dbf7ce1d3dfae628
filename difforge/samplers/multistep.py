"""Linear multistep solvers on the PF-ODE dx/dsigma = eps(x; sigma) = (x - D(x; sigma)) / sigma with
variable steps: the history of eps is extrapolated by a Lagrange polynomial in a time variable tau
and integrated exactly over sigma. The choice of tau is the whole difference between the methods:

  ipndm_v      tau = sigma: variable-step Adams-Bashforth (ComfyUI's `sample_ipndm_v`); on the
               Karras grid, whose step ratios are 0.01-0.5, the equal-step weights of `ipndm` are
               not Adams-Bashforth weights at all.
  deis         tau = t of a linear-beta VP SDE: tAB-DEIS (Zhang & Chen 2023, "Fast Sampling of
               Diffusion Models with Exponential Integrator", Sec. 4), in the sigma parameterization
               of ComfyUI's `sample_deis` (beta_min, beta_d from sigma 0.002 at t = 1e-3 and 80 at
               t = 1, whatever the model's range).
  deis_logrho  tau = log sigma: diffusers' DEISMultistepScheduler ("logrho", rho = sigma in VE).

Step i: x_{i+1} = x_i + sum_j C_ij eps_{i-j}, C_ij = int_{sigma_i}^{sigma_{i+1}} L_j(tau(sigma)) dsigma,
L_j the Lagrange basis over tau_i, tau_{i-1}, ... (DEIS Eq. 14 with Psi = 1 in VE space, where the
linear part of the ODE vanishes). The coefficients depend on the grid alone and are computed once,
in float64, before the loop. The step to sigma = 0 returns x0_hat (first order, as ComfyUI).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.core.errors import InvalidArgumentError
from difforge.samplers.base import Callback, denoise, emit, per_grid, sigma_list
from difforge.samplers.noise import NoiseSource

# Gauss-Legendre nodes on [-1, 1]: exact for polynomials in sigma of degree < 64, and converged to
# float64 round-off for the smooth maps tau(sigma) below on any step that does not reach sigma = 0.
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(32)

# ComfyUI's edm2t (from zju-pi/diff-sampler): the linear-beta VP SDE with sigma(1e-3) = 0.002 and
# sigma(1) = 80, sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1).
_EPS_S, _VP_SIGMA_MIN, _VP_SIGMA_MAX = 1e-3, 0.002, 80.0
_BETA_D = 2 * (math.log1p(_VP_SIGMA_MIN**2) / _EPS_S - math.log1p(_VP_SIGMA_MAX**2)) / (_EPS_S - 1)
_BETA_MIN = math.log1p(_VP_SIGMA_MAX**2) - 0.5 * _BETA_D


def vp_time(sigma: np.ndarray) -> np.ndarray:
    """t(sigma) of that VP SDE: the inverse of sigma(t) above (tAB-DEIS's time variable)."""
    return (np.sqrt(_BETA_MIN**2 + 2 * _BETA_D * np.log1p(sigma**2)) - _BETA_MIN) / _BETA_D


TAUS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "sigma": lambda s: s,
    "vp_time": vp_time,
    "log_sigma": np.log,
}


def multistep_weights(
    sigmas: Sequence[float], max_order: int, tau: Callable[[np.ndarray], np.ndarray]
) -> tuple[tuple[float, ...], ...]:
    """C_ij for every step i (newest eps first): order min(i + 1, max_order), 1 on the last step
    when it ends at sigma = 0. Returns one tuple of weights per step (computed once per grid)."""
    return _weights(tuple(sigmas), max_order, tau)


@per_grid
def _weights(
    sigmas: tuple[float, ...], max_order: int, tau: Callable[[np.ndarray], np.ndarray]
) -> tuple[tuple[float, ...], ...]:
    out = []
    for i in range(len(sigmas) - 1):
        a, b = sigmas[i], sigmas[i + 1]
        order = 1 if b == 0 else min(i + 1, max_order)
        if order == 1:
            out.append((b - a,))  # Euler: int_a^b dsigma
            continue
        # Gauss-Legendre nodes in (b, a), interior, so none equals a history time; weights of
        # int_a^b (negative: sigma decreases)
        nodes = 0.5 * (a + b) + 0.5 * (b - a) * _GL_NODES  # (N,)
        w = 0.5 * (b - a) * _GL_WEIGHTS  # (N,)
        t_hist = tau(np.array(sigmas[i - order + 1 : i + 1][::-1], dtype=np.float64))  # (p,)
        diff = tau(nodes)[None, :] - t_hist[:, None]  # (p, N): tau - tau_k
        gaps = t_hist[:, None] - t_hist[None, :] + np.eye(order)  # (p, p): tau_j - tau_k, 1 on j=k
        # L_j = prod_{k != j} (tau - tau_k) / (tau_j - tau_k)
        basis = diff.prod(axis=0)[None, :] / diff / gaps.prod(axis=1)[:, None]  # (p, N)
        out.append(tuple((basis @ w).tolist()))
    return tuple(out)


def _sample_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    cond: Cond,
    callback: Callback | None,
    max_order: int,
    tau: str,
    name: str,
    orders: tuple[int, ...],
) -> Tensor:
    if max_order not in orders:
        raise InvalidArgumentError(f"{name} max_order must be one of {orders}, got {max_order!r}")
    s = sigma_list(sigmas)
    weights = multistep_weights(s, max_order, TAUS[tau])
    history: list[Tensor] = []  # eps of the latest steps, newest first
    for i in range(len(s) - 1):
        denoised = denoise(denoiser, x, s[i], cond)
        history.insert(0, (x - denoised) / s[i])
        del history[max_order:]
        if s[i + 1] == 0:
            x = denoised
        else:
            for c, eps in zip(weights[i], history, strict=False):
                x = x.add(eps, alpha=c)  # one op per term: x + c eps
        x = emit(callback, i, s, x, denoised)
    return x


def sample_ipndm_v(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    max_order: int = 4,
) -> Tensor:
    """Variable-step iPNDM: Adams-Bashforth in sigma with the weights of the actual steps (Zhang &
    Chen 2023, App. D, for unequal steps; ComfyUI's ipndm_v); `max_order` in 1..4."""
    return _sample_multistep(
        denoiser, x, sigmas, cond, callback, max_order, "sigma", "ipndm_v", (1, 2, 3, 4)
    )


def sample_deis(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    max_order: int = 3,
) -> Tensor:
    """tAB-DEIS (Zhang & Chen 2023, Sec. 4): eps extrapolated in VP time t; `max_order` in 1..3."""
    return _sample_multistep(
        denoiser, x, sigmas, cond, callback, max_order, "vp_time", "deis", (1, 2, 3)
    )


def sample_deis_logrho(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    max_order: int = 3,
) -> Tensor:
    """DEIS with eps extrapolated in log rho = log sigma (diffusers' DEISMultistepScheduler,
    "logrho"; Zhang & Chen 2023, Sec. 4 rhoAB with a log time); `max_order` in 1..3."""
    return _sample_multistep(
        denoiser, x, sigmas, cond, callback, max_order, "log_sigma", "deis_logrho", (1, 2, 3)
    )
