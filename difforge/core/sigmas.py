"""Sigma grids for sampling: n noise levels from sigma_max down to sigma_min, then a final 0."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.core.processes import DiscreteVP, NoiseProcess

GridKind = Literal["karras", "exponential", "uniform", "vp_time", "vp_time_mid"]
GRID_KINDS: tuple[str, ...] = ("karras", "exponential", "uniform", "vp_time", "vp_time_mid")
# The VP SDE of Song et al. 2021 (Eq. 11 with beta(t) = beta_min + t beta_d): the continuous limit of
# DDPM's linear betas 1e-4..0.02 over 1000 steps, the schedule diffusers' multistep solvers step on.
VP_BETA_MIN, VP_BETA_D = 0.1, 19.9
Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS: tuple[str, ...] = ("leading", "trailing", "linspace")


def _append_zero(s: Tensor) -> Tensor:
    return torch.cat([s, s.new_zeros(1)])


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """sigma_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho (Karras 2022, Eq. 5)."""
    ramp = (
        torch.linspace(0, 1, n, dtype=torch.float64)
        if n > 1
        else torch.zeros(1, dtype=torch.float64)
    )
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((hi + ramp * (lo - hi)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Evenly spaced in log sigma (the grid of DPM-Solver's logSNR spacing), computed in float64
    (a float32 linspace, as k-diffusion's `get_sigmas_exponential`, is off by up to 3e-7 relative)."""
    if n == 1:
        return _append_zero(torch.tensor([sigma_max], dtype=torch.float64))
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp())


def vp_time_to_sigma(t: Tensor) -> Tensor:
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) of that VP SDE (x = x0 + sigma eps)."""
    return torch.expm1(0.5 * VP_BETA_D * t**2 + VP_BETA_MIN * t).sqrt()


def vp_sigma_to_time(sigma: Tensor) -> Tensor:
    """The inverse: t(sigma) = (sqrt(beta_min^2 + 2 beta_d log(1 + sigma^2)) - beta_min) / beta_d."""
    return (
        (VP_BETA_MIN**2 + 2 * VP_BETA_D * torch.log1p(sigma**2)).sqrt() - VP_BETA_MIN
    ) / VP_BETA_D


def vp_time_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n levels evenly spaced in the VP time t, t_max (n - i) / n for i < n, t_max = t(sigma_max),
    then 0: the "linspace" spacing of diffusers' multistep schedulers (timesteps linspace(0, T-1,
    n + 1) rounded, largest first, the last dropped, final sigma 0) on a continuous range. The
    last level is sigma(t_max / n), not sigma_min: few-step solvers spend no evaluation where
    D(x; sigma) ~ x (the Karras grid's last level, 0.002, costs one NFE of n and moves x by
    ~1e-3). Levels below sigma_min (only for n in the thousands) are raised to it."""
    t_max = _vp_t_max(sigma_max)
    t = t_max * torch.arange(n, 0, -1, dtype=torch.float64) / n  # (n,) t_max .. t_max / n
    return _vp_levels(t, sigma_min, sigma_max)


def _vp_t_max(sigma_max: float) -> Tensor:
    return vp_sigma_to_time(torch.tensor(sigma_max, dtype=torch.float64))


def _vp_levels(t: Tensor, sigma_min: float, sigma_max: float) -> Tensor:
    """The sigma grid at VP times t (t[0] = t(sigma_max)), raised to sigma_min, then 0."""
    sigmas = vp_time_to_sigma(t).clamp(min=sigma_min)
    sigmas[0] = sigma_max  # exact, not through the round trip t(sigma_max)
    return _append_zero(sigmas)


def vp_time_mid_sigmas(n: int, sigma_min: float, sigma_max: float) -> Tensor:
    """n levels evenly spaced in the VP time from t_max down to t_max / (2n), the midpoint of
    `vp_time_sigmas`' last interval [0, t_max / n], then 0: t_i = t_max (1 - i (2n - 1) / (2n (n - 1))).
    vp_time's last step jumps from sigma(t_max / n) (0.87 at 4 steps on sigma_max = 80) to D's
    estimate there, a posterior mean: smoother than the ODE's solution. Ending at half that time
    (sigma 0.40 at 4 steps) lands closer to the solution's distribution at 4 NFE; unguided it
    also has the lower RMSE at every NFE, under guidance 2 vp_time keeps it at 5-8 (measured:
    benchmarks/solver_quality.py, README "Few steps"). Levels below sigma_min are raised to it."""
    t_max = _vp_t_max(sigma_max)
    if n == 1:
        return _vp_levels(t_max.reshape(1), sigma_min, sigma_max)
    i = torch.arange(n, dtype=torch.float64)
    return _vp_levels(t_max * (1 - i * (2 * n - 1) / (2 * n * (n - 1))), sigma_min, sigma_max)


def uniform_timesteps(process: DiscreteVP, n: int, spacing: str = "leading") -> Tensor:
    """Evenly spaced training timesteps, largest first (DDIM's grid; diffusers' `timestep_spacing`).

    leading: (0, T//n, 2T//n, ...) reversed (Song et al. 2021 DDIM, diffusers' DDIM default);
    trailing: round(T, T - T/n, ...) - 1 (Lin et al. 2024, Tab. 2); linspace: linspace(T-1, 0, n).
    """
    check_choice("timestep spacing", spacing, SPACINGS)
    T = process.num_timesteps
    if n > T:
        raise InvalidArgumentError(f"steps ({n}) cannot exceed the process's {T} timesteps")
    if spacing == "leading":
        return (torch.arange(n, dtype=torch.float64) * (T // n)).flip(0)
    if spacing == "trailing":
        return (torch.arange(T, 0, -T / n, dtype=torch.float64).round() - 1)[:n]
    return torch.linspace(T - 1, 0, n, dtype=torch.float64)


def sigmas_from_timesteps(process: NoiseProcess, timesteps: Tensor) -> Tensor:
    """The sigma grid visiting exactly these timesteps (largest first), with a final 0."""
    return _append_zero(process.t_to_sigma(torch.as_tensor(timesteps, dtype=torch.float64)))


def get_sigmas(
    kind: str,
    n: int,
    sigma_min: float | None = None,
    sigma_max: float | None = None,
    *,
    process: NoiseProcess | None = None,
    rho: float = 7.0,
    spacing: str = "leading",
) -> Tensor:
    """A grid of n sampling noise levels plus a final 0: float64, shape (n + 1,), decreasing.

    Args:
        kind: "karras" (Karras 2022 Eq. 5, with `rho`), "exponential" (even in log sigma),
            "uniform" (evenly spaced timesteps of `process`; for a DiscreteVP process `spacing`
            picks leading / trailing / linspace, as diffusers' `timestep_spacing`) or "vp_time"
            (even in the time of the linear-beta VP SDE, trailing: `vp_time_sigmas`; the few-step
            default of the multistep solvers, benchmarks/solver_quality.py) or "vp_time_mid" (the
            same spacing ending at half vp_time's last time: `vp_time_mid_sigmas`).
        n: number of sampling steps (>= 1).
        sigma_min, sigma_max: range; default to the process's range when a process is given.
    """
    check_choice("sigma grid", kind, GRID_KINDS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1, got {n!r}")
    if process is not None:
        sigma_min = process.sigma_min if sigma_min is None else sigma_min
        sigma_max = process.sigma_max if sigma_max is None else sigma_max
    if sigma_min is None or sigma_max is None:
        raise InvalidArgumentError("give sigma_min and sigma_max, or a process to take them from")
    if not (0 < sigma_min < sigma_max < math.inf):
        raise InvalidArgumentError(
            f"need 0 < sigma_min < sigma_max < inf, got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if kind == "karras":
        if not (rho > 0 and math.isfinite(rho)):
            raise InvalidArgumentError(f"rho must be positive and finite, got {rho}")
        return karras_sigmas(n, sigma_min, sigma_max, rho)
    if kind == "exponential":
        return exponential_sigmas(n, sigma_min, sigma_max)
    if kind == "vp_time":
        return vp_time_sigmas(n, sigma_min, sigma_max)
    if kind == "vp_time_mid":
        return vp_time_mid_sigmas(n, sigma_min, sigma_max)
    if process is None:
        raise InvalidArgumentError("the 'uniform' grid needs the process whose timesteps it spaces")
    if isinstance(process, DiscreteVP):
        return sigmas_from_timesteps(process, uniform_timesteps(process, n, spacing))
    t_hi, t_lo = (
        process.sigma_to_t(torch.tensor(sigma_max)),
        process.sigma_to_t(torch.tensor(sigma_min)),
    )
    return sigmas_from_timesteps(
        process, torch.linspace(float(t_hi), float(t_lo), n, dtype=torch.float64)
    )
