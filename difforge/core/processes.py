"""Noise processes: how clean data x0 is corrupted, each written through one VE noise level sigma.

Notation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models",
Eq. 10): every process is x_t = s(t) * (x0 + sigma(t) * eps), eps ~ N(0, I). difforge samplers work
in the VE variable x = x0 + sigma * eps; `input_scale(sigma)` = s maps it back to the space the
network was trained in.

  VP / DDPM (Ho et al. 2020, Eq. 4):     s = sqrt(alpha_bar), sigma = sqrt((1 - alpha_bar) / alpha_bar)
  VE / EDM (Karras et al. 2022, Tab. 1): s = 1,               sigma = t
  Rectified flow (Liu et al. 2022, Eq. 1): x_t = (1 - t) x0 + t eps  =>  s = 1 - t, sigma = t / (1 - t)

SNR(sigma) = 1 / sigma^2 for all of them (Kingma et al. 2021, Eq. 2, with alpha = s, sigma_vp = s sigma).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError, check_choice

BetaSchedule = Literal["linear", "scaled_linear", "cosine", "sigmoid"]
BETA_SCHEDULES: tuple[str, ...] = ("linear", "scaled_linear", "cosine", "sigmoid")
ProcessKind = Literal["vp", "ve", "flow"]
PROCESS_KINDS: tuple[str, ...] = ("vp", "ve", "flow")


@runtime_checkable
class NoiseProcess(Protocol):
    """What samplers, adapters and training need to know of a forward process."""

    kind: str
    sigma_min: float
    sigma_max: float

    def sigma_to_t(self, sigma: Tensor) -> Tensor: ...

    def t_to_sigma(self, t: Tensor) -> Tensor: ...

    def input_scale(self, sigma: Tensor) -> Tensor: ...

    def to_dict(self) -> dict: ...


def snr(sigma: Tensor) -> Tensor:
    """Signal-to-noise ratio alpha^2 / sigma_vp^2 = 1 / sigma^2 (Kingma et al. 2021, Eq. 2)."""
    return sigma.double().pow(-2)


def _betas_from_alpha_bar(alpha_bar_fn, T: int) -> Tensor:
    """beta_t = 1 - alpha_bar(t) / alpha_bar(t - 1), capped at 0.999 (Nichol & Dhariwal 2021, Eq. 17)."""
    t = torch.arange(T + 1, dtype=torch.float64) / T
    ab = alpha_bar_fn(t)
    return (1 - ab[1:] / ab[:-1]).clamp(max=0.999)


def make_betas(schedule: str, T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02):
    """Discrete beta_1..beta_T for one of BETA_SCHEDULES, float64, shape (T,).

    linear: Ho et al. 2020 Sec. 4; scaled_linear: Rombach et al. 2022 (linear in sqrt(beta));
    cosine: Nichol & Dhariwal 2021 Eq. 17 (s = 0.008); sigmoid: Chen 2023, "On the Importance of
    Noise Scheduling for Diffusion Models", Alg. 1 (start=-3, end=3, tau=1).
    """
    check_choice("beta schedule", schedule, BETA_SCHEDULES)
    if not (isinstance(T, int) and T >= 2):
        raise InvalidArgumentError(f"num_timesteps must be an integer >= 2, got {T!r}")
    if not (0 < beta_start < beta_end < 1):
        raise InvalidArgumentError(
            f"need 0 < beta_start < beta_end < 1, got beta_start={beta_start}, beta_end={beta_end}"
        )
    if schedule == "linear":
        return torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
    if schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, T, dtype=torch.float64) ** 2
    if schedule == "cosine":
        s = 0.008
        return _betas_from_alpha_bar(lambda t: torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2, T)
    start, end, tau = -3.0, 3.0, 1.0
    v_start, v_end = math.tanh(start / tau / 2), math.tanh(end / tau / 2)  # sigmoid = (tanh+1)/2

    def alpha_bar(t: Tensor) -> Tensor:
        return (
            (v_end - torch.tanh((t * (end - start) + start) / tau / 2)) / (v_end - v_start)
        ).clamp(min=1e-9)

    return _betas_from_alpha_bar(alpha_bar, T)


@dataclass(frozen=True)
class DiscreteVP:
    """DDPM's discrete variance-preserving process on timesteps t = 0..T-1.

    Continuous t between integers interpolates sigma linearly in t (the convention of diffusers'
    Euler schedulers), and `sigma_to_t` is its exact inverse.
    """

    schedule: BetaSchedule = "linear"
    num_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    kind: str = field(default="vp", init=False)
    alphas_cumprod: Tensor = field(init=False, repr=False, compare=False)
    sigmas: Tensor = field(init=False, repr=False, compare=False)
    _np_sigmas: np.ndarray = field(init=False, repr=False, compare=False)
    _np_steps: np.ndarray = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        betas = make_betas(self.schedule, self.num_timesteps, self.beta_start, self.beta_end)
        ab = torch.cumprod(1 - betas, dim=0)
        object.__setattr__(self, "alphas_cumprod", ab)
        object.__setattr__(self, "sigmas", ((1 - ab) / ab).sqrt())
        object.__setattr__(self, "_np_sigmas", self.sigmas.numpy())
        object.__setattr__(self, "_np_steps", np.arange(self.num_timesteps, dtype=np.float64))

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_timesteps - 1)
        lo = t.floor().long().clamp(max=self.num_timesteps - 2)
        w = t - lo
        return (1 - w) * self.sigmas[lo] + w * self.sigmas[lo + 1]

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        # Inverse of the piecewise-linear t_to_sigma; few ops, since it runs once per network call.
        sigma = torch.as_tensor(sigma)
        if sigma.is_cpu and sigma.numel() <= 4096:
            # one numpy call instead of ~10 tiny torch ops: this runs before every network call
            t_np = np.interp(sigma.double().numpy(), self._np_sigmas, self._np_steps)
            return torch.from_numpy(np.asarray(t_np, dtype=np.float64)).reshape(sigma.shape)
        table, inv_step = self._tables(sigma.device)
        s = sigma.to(torch.float64)
        lo = (torch.searchsorted(table, s, right=True) - 1).clamp_(0, self.num_timesteps - 2)
        t = lo + (s - table[lo]) * inv_step[lo]
        return t.clamp_(0, self.num_timesteps - 1)

    def _tables(self, device: torch.device) -> tuple[Tensor, Tensor]:
        """(sigmas, 1 / (sigma_{t+1} - sigma_t)) on `device`, built once per device."""
        cache = self.__dict__.setdefault("_device_tables", {})
        if device not in cache:
            inv = 1 / (self.sigmas[1:] - self.sigmas[:-1])
            cache[device] = (self.sigmas.to(device), inv.to(device))
        return cache[device]

    def alpha_bar(self, t: Tensor) -> Tensor:
        """alpha_bar(t) = 1 / (1 + sigma(t)^2)."""
        return 1 / (1 + self.t_to_sigma(t) ** 2)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return (1 + sigma**2).rsqrt()

    def to_dict(self) -> dict:
        return {
            "kind": "vp",
            "schedule": self.schedule,
            "num_timesteps": self.num_timesteps,
            "beta_start": self.beta_start,
            "beta_end": self.beta_end,
        }


@dataclass(frozen=True)
class VEProcess:
    """Variance-exploding / EDM process: x = x0 + sigma * eps, t = sigma (Karras et al. 2022, Tab. 1)."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    kind: str = field(default="ve", init=False)

    def __post_init__(self) -> None:
        if not (0 < self.sigma_min < self.sigma_max < math.inf):
            raise InvalidArgumentError(
                f"need 0 < sigma_min < sigma_max < inf, got {self.sigma_min}, {self.sigma_max}"
            )

    def t_to_sigma(self, t: Tensor) -> Tensor:
        return torch.as_tensor(t, dtype=torch.float64)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        return torch.as_tensor(sigma, dtype=torch.float64)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return torch.ones_like(sigma)

    def to_dict(self) -> dict:
        return {"kind": "ve", "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


@dataclass(frozen=True)
class RectifiedFlow:
    """Rectified flow x_t = (1 - t) x0 + t eps (Liu et al. 2022, Eq. 1), t in [t_min, t_max].

    t = 1 is pure noise, where sigma = t / (1 - t) is infinite; sampling starts at t_max < 1.
    """

    t_min: float = 1e-3
    t_max: float = 0.995
    kind: str = field(default="flow", init=False)

    def __post_init__(self) -> None:
        if not (0 < self.t_min < self.t_max < 1):
            raise InvalidArgumentError(
                f"need 0 < t_min < t_max < 1, got {self.t_min}, {self.t_max}"
            )

    @property
    def sigma_min(self) -> float:
        return self.t_min / (1 - self.t_min)

    @property
    def sigma_max(self) -> float:
        return self.t_max / (1 - self.t_max)

    def t_to_sigma(self, t: Tensor) -> Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return t / (1 - t)

    def sigma_to_t(self, sigma: Tensor) -> Tensor:
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        return sigma / (1 + sigma)

    def input_scale(self, sigma: Tensor) -> Tensor:
        return 1 / (1 + sigma)

    def to_dict(self) -> dict:
        return {"kind": "flow", "t_min": self.t_min, "t_max": self.t_max}


def q_sample(process: NoiseProcess, x0: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    """Closed-form forward process q(x_t | x0) in the network's own space: s(sigma)(x0 + sigma eps).

    For VP this is sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps (Ho et al. 2020, Eq. 4).
    """
    sigma = append_dims(torch.as_tensor(sigma, dtype=x0.dtype, device=x0.device), x0.ndim)
    return process.input_scale(sigma) * (x0 + sigma * eps)


def append_dims(v: Tensor, ndim: int) -> Tensor:
    """Reshape a (B,) or scalar tensor to broadcast against a (B, ...) tensor of `ndim` dims."""
    if v.ndim == 0:
        return v
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def make_process(spec: dict) -> NoiseProcess:
    """Build a process from its `to_dict()` form, e.g. {"kind": "vp", "schedule": "cosine"}."""
    spec = dict(spec)
    kind = spec.pop("kind", None)
    check_choice("process kind", kind, PROCESS_KINDS)
    cls = {"vp": DiscreteVP, "ve": VEProcess, "flow": RectifiedFlow}[kind]
    try:
        return cls(**spec)
    except TypeError as e:
        raise InvalidArgumentError(f"bad arguments for process {kind!r}: {e}") from None
