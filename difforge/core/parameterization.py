"""Pure conversions between the four things a network may predict, written once.

All in VE terms: x = x0 + sigma * eps is the noisy sample, sigma broadcastable against x.

  eps:      the noise (Ho et al. 2020, Eq. 12)              x0 = x - sigma * eps
  x0:       the clean sample
  v:        v = alpha eps - sigma_vp x0 (Salimans & Ho 2022, Sec. 4), with alpha = 1 / sqrt(1 + sigma^2),
            sigma_vp = sigma alpha; the network sees z = alpha x, so x0 = alpha z - sigma_vp v
  velocity: u = eps - x0 (Liu et al. 2022, Eq. 1), with x_t = (1 - t) x0 + t eps = x / (1 + sigma),
            t = sigma / (1 + sigma), so x0 = x_t - t u = (x - sigma u) / (1 + sigma)

Every prediction is affine in the network output: x0 = a(sigma) x + c_out(sigma) * out, and
|c_out| is what turns an x0-space loss into that prediction's native loss (see `x0_loss_weight`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from difforge.core.errors import check_choice

Prediction = Literal["eps", "x0", "v", "velocity"]
PREDICTIONS: tuple[str, ...] = ("eps", "x0", "v", "velocity")


def x0_from_eps(x: Tensor, sigma: Tensor, eps: Tensor) -> Tensor:
    return x - sigma * eps


def eps_from_x0(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    return (x - x0) / sigma


def v_from(x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    alpha = (1 + sigma**2).rsqrt()
    return alpha * eps - sigma * alpha * x0


def x0_from_v(x: Tensor, sigma: Tensor, v: Tensor) -> Tensor:
    alpha2 = 1 / (1 + sigma**2)
    return alpha2 * x - sigma * alpha2.sqrt() * v


def velocity_from(x0: Tensor, eps: Tensor) -> Tensor:
    return eps - x0


def x0_from_velocity(x: Tensor, sigma: Tensor, u: Tensor) -> Tensor:
    return (x - sigma * u) / (1 + sigma)


def _x0_from_x0(x: Tensor, sigma: Tensor, x0: Tensor) -> Tensor:
    return x0


_TO_X0 = {"eps": x0_from_eps, "x0": _x0_from_x0, "v": x0_from_v, "velocity": x0_from_velocity}


def x0_converter(prediction: str) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """`to_x0` for one prediction kind, `f(x, sigma, out) -> x0_hat`, to look up once."""
    check_choice("prediction", prediction, PREDICTIONS)
    return _TO_X0[prediction]


def to_x0(prediction: str, x: Tensor, sigma: Tensor, out: Tensor) -> Tensor:
    """x0_hat from a network output of kind `prediction` at noisy sample x (VE) and level sigma."""
    return x0_converter(prediction)(x, sigma, out)


def target(prediction: str, x0: Tensor, eps: Tensor, sigma: Tensor) -> Tensor:
    """The regression target of a network predicting `prediction` (its native loss target)."""
    check_choice("prediction", prediction, PREDICTIONS)
    if prediction == "eps":
        return eps
    if prediction == "x0":
        return x0
    if prediction == "v":
        return v_from(x0, eps, sigma)
    return velocity_from(x0, eps)


def x0_loss_weight(prediction: str, sigma: Tensor) -> Tensor:
    """w(sigma) with ||out - target||^2 = w(sigma) ||x0_hat - x0||^2, i.e. 1 / c_out(sigma)^2.

    eps: 1/sigma^2 = SNR; x0: 1; v: (1 + sigma^2)/sigma^2 = SNR + 1; velocity: (1 + sigma)^2/sigma^2.
    """
    check_choice("prediction", prediction, PREDICTIONS)
    sigma = torch.as_tensor(sigma)
    if prediction == "eps":
        return sigma.pow(-2)
    if prediction == "x0":
        return torch.ones_like(sigma)
    if prediction == "v":
        return (1 + sigma**2) / sigma**2
    return ((1 + sigma) / sigma) ** 2
