"""RePaint's resampling (Lugmayr et al. 2022, Sec. 4.2 and Alg. 1): now and then go back
up `jump_length` noise levels by re-noising and sample down again, `jump_n_sample` times in all,
so the generated region harmonizes with the re-imposed known one (`difforge.core.editing.Inpaint`).

The schedule is diffusers' `RePaintScheduler.set_timesteps`, written as the path of state indices
into the grid (index k: x at sigmas[k]); a +1 move is a step of the chosen sampler, a run of -1
moves one re-noising x += sqrt(sigma_hi^2 - sigma_lo^2) z (the VE forward process). Each downward
run is one call of the sampler on its sub-grid, so a multistep sampler restarts its history there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from difforge.core.denoiser import Denoiser
from difforge.core.errors import InvalidArgumentError
from difforge.samplers.base import sigma_list
from difforge.samplers.noise import NoiseSource


def jump_schedule(n: int, jump_length: int, jump_n_sample: int) -> list[int]:
    """The state indices visited over a grid of n steps (0 = sigma_max, n = the final sigma)."""
    for what, v in (("jump_length", jump_length), ("jump_n_sample", jump_n_sample)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidArgumentError(f"RePaint {what} must be an integer >= 1, got {v!r}")
    jumps = {t: jump_n_sample - 1 for t in range(0, n - jump_length, jump_length)}
    path, t = [0], n  # t: diffusers' timestep index, the state after it is n - t
    while t >= 1:
        t -= 1
        path.append(n - t)
        if jumps.get(t, 0) > 0:
            jumps[t] -= 1
            for _ in range(jump_length):
                t += 1
                path.append(n - t)
    return path


def run_with_jumps(
    fn,
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    path: list[int],
    *,
    renoise: NoiseSource,
    **sampler_kwargs,
) -> Tensor:
    """Follow `path` (from `jump_schedule`): sampler `fn` down each rising-index run (with
    `sampler_kwargs`: cond, noise, callback, knobs), `renoise` draws for each falling one."""
    s = sigma_list(sigmas)
    k = 0
    while k < len(path) - 1:
        j, step = k, 1 if path[k + 1] > path[k] else -1
        while j + 1 < len(path) and path[j + 1] - path[j] == step:
            j += 1
        lo, hi = sorted((path[k], path[j]))
        if step == 1:
            sub = torch.tensor(s[lo : hi + 1], dtype=torch.float64)
            x = fn(denoiser, x, sub, **sampler_kwargs)
        else:
            x = x + renoise(x) * math.sqrt(s[lo] ** 2 - s[hi] ** 2)
        k = j
    return x
