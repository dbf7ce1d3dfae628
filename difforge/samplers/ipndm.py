"""iPNDM: improved pseudo linear multistep (Zhang & Chen 2023, "Fast Sampling of Diffusion Models
with Exponential Integrator", Sec. 5 / App. D), Adams-Bashforth on d = (x - D) / sigma with a
lower-order warm start, up to 4th order, one evaluation per step."""

from __future__ import annotations

from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.core.errors import InvalidArgumentError
from difforge.samplers.base import Callback, denoise, emit, sigma_list
from difforge.samplers.noise import NoiseSource

# Adams-Bashforth weights, newest derivative first (order 1..4).
_AB = ((1.0,), (3 / 2, -1 / 2), (23 / 12, -16 / 12, 5 / 12), (55 / 24, -59 / 24, 37 / 24, -9 / 24))


def sample_ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    cond: Cond = None,
    noise: NoiseSource | None = None,
    callback: Callback | None = None,
    max_order: int = 4,
) -> Tensor:
    """iPNDM with `max_order` in 1..4 (4 is the published setting).

    The step to sigma = 0 returns x0_hat (as ComfyUI's `sample_ipndm` and our dpmpp_2m): the
    Adams-Bashforth weights assume a step as long as the history's spacing, and the final jump
    sigma_min -> 0 does not shrink with the step count, so using them there adds an O(1/n) error.
    Measured on the exact Gaussian-mixture denoiser (Karras grid 0.05..10, RMSE against Heun-2048,
    tests/unit/test_convergence_order.py's setup, `pytest -s` prints the slopes): with the AB last
    step (this function before commit 6421078) the slope fell to 1.35 between 64 and 128 steps;
    with x0_hat it stays 2.0. At 4-15 steps the two differ by < 3%.
    """
    if max_order not in (1, 2, 3, 4):
        raise InvalidArgumentError(f"ipndm max_order must be 1, 2, 3 or 4, got {max_order!r}")
    s = sigma_list(sigmas)
    history: list[Tensor] = []  # newest first
    for i in range(len(s) - 1):
        denoised = denoise(denoiser, x, s[i], cond)
        history.insert(0, (x - denoised) / s[i])
        del history[max_order:]
        if s[i + 1] == 0:
            x = denoised  # the last step: see the docstring
        else:
            h = s[i + 1] - s[i]
            for w, eps in zip(_AB[len(history) - 1], history, strict=True):
                x = x.add(eps, alpha=w * h)  # one op per term: x + h w_j eps_{i-j}
        x = emit(callback, i, s, x, denoised)
    return x
