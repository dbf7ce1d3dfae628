"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models", Alg. 2 with data prediction), in VE space where lambda = -log sigma.

Each step evaluates D once at the predicted x_i, corrects x_i with UniC from that evaluation (no
extra NFE: the evaluation at the uncorrected point is reused, Sec. 3.2), then predicts x_{i+1} with
UniP. Orders follow diffusers' UniPCMultistepScheduler: order min(order, i + 1) to warm up, and
lower at the end (min(order, steps - i)), so the step to sigma = 0 returns x0_hat. B(h) is h
("bh1") or e^h - 1 ("bh2", the paper's default for guided sampling). Coefficients depend on the
grid alone and are computed in float64 before the loop.

A callback that replaces x (an editing hook) edits the predicted x_{i+1}; the corrector then
recomputes x_{i+1} from x_i, so the edit only reaches the final image through the last step.
"""

from __future__ import annotations

import math

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.core.errors import InvalidArgumentError
from difforge.samplers.base import Callback, denoise, emit, per_grid, sigma_list
from difforge.samplers.noise import NoiseSource


def _solve(m: list[list[float]], v: list[float]) -> list[float]:
    """m^-1 v for the tiny (<= 3 x 3) systems below: Gaussian elimination, partial pivoting."""
    n = len(v)
    rows = [[*m[r], v[r]] for r in range(n)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(rows[r][c]))
        rows[c], rows[p] = rows[p], rows[c]
        for r in range(c + 1, n):
            f = rows[r][c] / rows[c][c]
            rows[r] = [x - f * y for x, y in zip(rows[r], rows[c], strict=True)]
    out = [0.0] * n
    for r in reversed(range(n)):
        out[r] = (rows[r][n] - sum(rows[r][k] * out[k] for k in range(r + 1, n))) / rows[r][r]
    return out


def _rhos(lams: list[float], i: int, order: int, bh2: bool, corrector: bool):
    """Coefficients of one UniP (corrector=False) or UniC step from lambda_i to lambda_{i+1} with
    history lambda_{i-1}, ..., lambda_{i-order+1} (Zhao et al. 2023, Alg. 2 / Eq. 8-9).

    Returns (h_phi_1, B_h, r, rhos): r_k = (lambda_{i-k} - lambda_i) / h for k = 1..order-1, rhos
    the weights of D1_k = (m_{i-k} - m_i) / r_k (and, for UniC, of m_{i+1} - m_i last).
    """
    h = lams[i + 1] - lams[i]
    hh = -h  # data prediction
    h_phi_1 = math.expm1(hh)
    b_h = math.expm1(hh) if bh2 else hh
    r = [(lams[i - k] - lams[i]) / h for k in range(1, order)]
    rks = [*r, 1.0]
    R, b = [], []  # R[k][j] = rks[j]^k; b[k] = k! h phi_{k+1}(hh) / B(h) (Alg. 2)
    h_phi_k, factorial = h_phi_1 / hh - 1, 1
    for k in range(1, order + 1):
        R.append([q ** (k - 1) for q in rks])
        b.append(h_phi_k * factorial / b_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    if corrector:
        rhos = [0.5] if order == 1 else _solve(R, b)
    elif order == 1:
        rhos = []
    else:
        rhos = [0.5] if order == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    return h_phi_1, b_h, tuple(r), tuple(rhos)


def _predictor_weights(h_phi_1: float, b_h: float, r, rhos) -> tuple[float, ...]:
    """UniP's x0_hat terms -h_phi_1 m_i - B(h) sum_k rho_k (m_{i-k} - m_i) / r_k as one weight
    per x0_hat (m_i, m_{i-1}, ...): each difference would be a tensor op, cache-cold at batch 1."""
    c = [-b_h * rho / rk for rho, rk in zip(rhos, r, strict=False)]
    return (-h_phi_1 - sum(c), *c)


def _corrector_weights(h_phi_1: float, b_h: float, r, rhos) -> tuple[float, ...]:
    """UniC's -h_phi_1 m_{i-1} - B(h) (rho_last (m_i - m_{i-1}) + sum_k rho_k (m_{i-1-k} -
    m_{i-1}) / r_k) as one weight per x0_hat: (m_i, m_{i-1}, m_{i-2}, ...)."""
    c_new = -b_h * rhos[-1]
    c = [-b_h * rho / rk for rho, rk in zip(rhos[:-1], r, strict=False)]
    return (c_new, -h_phi_1 - c_new - sum(c), *c)


@per_grid
def _plan(s: tuple[float, ...], order: int, bh2: bool) -> tuple[tuple, tuple]:
    """Per step: its UniP weights and its UniC weights (None where the step ends at sigma = 0,
    or for step 0's corrector), once per grid."""
    n = len(s) - 1
    lams = [-math.log(v) if v > 0 else math.inf for v in s]
    orders = [min(order, n - i, i + 1) for i in range(n)]
    predict = tuple(
        _predictor_weights(*_rhos(lams, i, orders[i], bh2, False)) if s[i + 1] > 0 else None
        for i in range(n)
    )
    correct = (
        None,
        *(
            _corrector_weights(*_rhos(lams, i - 1, orders[i - 1], bh2, True))
            if s[i + 1] > 0
            else None
            for i in range(1, n)
        ),
    )
    return predict, correct


def _unipc(denoiser, x, sigmas, cond, callback, order: int, bh2: bool, name: str) -> Tensor:
    if order not in (1, 2, 3):
        raise InvalidArgumentError(f"{name} order must be 1, 2 or 3, got {order!r}")
    s = sigma_list(sigmas)
    predict, correct = _plan(tuple(s), order, bh2)
    history: list[Tensor] = []  # x0_hat of the latest steps, newest first
    x_last = None  # x_{i-1}, the point the previous prediction started from
    for i in range(len(s) - 1):
        denoised = denoise(denoiser, x, s[i], cond)
        if i > 0 and s[i + 1] > 0:  # UniC (at the step to 0 the corrected x would be unused)
            x = x_last * (s[i] / s[i - 1])
            for c, m in zip(correct[i], (denoised, *history), strict=False):
                x = x.add(m, alpha=c)  # one op per x0_hat
        history.insert(0, denoised)
        del history[order:]
        x_last = x
        if s[i + 1] == 0:
            x = denoised
        else:  # UniP
            x = x * (s[i + 1] / s[i])
            for c, m in zip(predict[i], history, strict=False):
                x = x.add(m, alpha=c)
        x = emit(callback, i, s, x, denoised)
    return x


def sample_unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC-bh2 (Zhao et al. 2023, Alg. 2, B(h) = e^h - 1), `order` in 1..3."""
    return _unipc(denoiser, x, sigmas, cond, callback, order, True, "unipc")


def sample_unipc_bh1(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    order: int = 2,
) -> Tensor:
    """UniPC-bh1 (Zhao et al. 2023, Alg. 2, B(h) = h), `order` in 1..3."""
    return _unipc(denoiser, x, sigmas, cond, callback, order, False, "unipc_bh1")
