"""The sampler registry (name -> pure function) and `sample`, the one call that runs a sampler
with per-sample seeds, guidance and NFE counting."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from difforge.core.denoiser import CPU, CountingDenoiser, Denoiser
from difforge.core.errors import InvalidArgumentError, UnknownChoiceError, check_choice
from difforge.core.guidance import CFGDenoiser
from difforge.samplers.base import Callback, StepInfo, sigma_list
from difforge.samplers.consistency import sample_consistency
from difforge.samplers.ddim import sample_ddim, sample_ddpm
from difforge.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from difforge.samplers.dpmpp3m import sample_dpmpp_3m, sample_dpmpp_3m_sde
from difforge.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from difforge.samplers.ipndm import sample_ipndm
from difforge.samplers.multistep import sample_deis, sample_deis_logrho, sample_ipndm_v
from difforge.samplers.noise import PerSampleNoise
from difforge.samplers.repaint import jump_schedule, run_with_jumps
from difforge.samplers.unipc import sample_unipc, sample_unipc_bh1

SamplerFn = Callable[..., Tensor]

SAMPLERS: dict[str, SamplerFn] = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "euler_ancestral": sample_euler_ancestral,
    "heun": sample_heun,
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "ipndm": sample_ipndm,
    # training-free few-step solvers (issue #14), one evaluation per step each
    "ipndm_v": sample_ipndm_v,
    "deis": sample_deis,
    "deis_logrho": sample_deis_logrho,
    "unipc": sample_unipc,
    "unipc_bh1": sample_unipc_bh1,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_3m_sde": sample_dpmpp_3m_sde,
    # consistency students' multistep sampler (Song et al. 2023, Alg. 1)
    "consistency": sample_consistency,
}

# Names that run another entry's algorithm (see samplers/ddim.py for the derivation): alias ->
# canonical. They stay registered for their familiar names and knobs; sweeps over "all" samplers
# use `canonical_samplers()` so one algorithm is not measured twice.
ALIASES: dict[str, str] = {
    "ddim": "euler_ancestral",  # ddim(eta) = euler_ancestral(eta); eta = 0 (default) is euler
    "ddpm": "euler_ancestral",  # ddpm = euler_ancestral(eta=1), its default
    "consistency": "euler_ancestral",  # consistency = euler_ancestral(eta=inf): x = D + sigma' z
}

# Denoiser evaluations per call for a grid of `steps` levels ending in sigma = 0.
_EVALS_PER_STEP = {name: 1 for name in SAMPLERS} | {"heun": 2}

_RESERVED = ("cond", "noise", "callback")


def get_sampler(name: str) -> SamplerFn:
    check_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name]


def canonical_samplers() -> tuple[str, ...]:
    """The registered names that are not aliases: one entry per algorithm, in registry order."""
    return tuple(name for name in SAMPLERS if name not in ALIASES)


def expected_nfe(name: str, steps: int) -> int:
    """NFE of sampler `name` over `steps` steps ending at sigma = 0 (Heun's last step is Euler)."""
    check_choice("sampler", name, SAMPLERS)
    return _EVALS_PER_STEP[name] * steps - (_EVALS_PER_STEP[name] - 1)


def sampler_knobs(name: str) -> dict[str, object]:
    """The tunable keyword arguments of sampler `name` and their defaults."""
    params = inspect.signature(get_sampler(name)).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in _RESERVED
    }


def check_knobs(name: str, knobs: Mapping[str, object]) -> None:
    if not knobs:  # the common call: no inspect.signature (~0.1 ms) per sampling call
        check_choice("sampler", name, SAMPLERS)
        return
    allowed = sampler_knobs(name)
    for key, value in knobs.items():
        if key not in allowed:
            raise UnknownChoiceError(f"option for sampler {name!r}", key, allowed or ("(none)",))
        if isinstance(value, float) and not math.isfinite(value) and key != "s_tmax":
            raise InvalidArgumentError(f"sampler option {key} must be finite, got {value}")


@dataclass(frozen=True)
class SampleResult:
    x: Tensor  # (B, *shape) float32 samples in data space
    nfe: int  # denoiser evaluations; a batched cond+uncond forward counts once
    seeds: tuple[int, ...]


def _to_device(cond: Mapping[str, Tensor] | None, device) -> dict[str, Tensor] | None:
    return None if cond is None else {k: torch.as_tensor(v).to(device) for k, v in cond.items()}


def _guided(denoiser, guidance, b, uncond, rescale, interval, device) -> Denoiser:
    """The denoiser itself, or CFGDenoiser around it when guidance (or its rescale) is on."""
    if isinstance(guidance, int | float) and guidance == 1 and rescale <= 0:
        return denoiser  # the unguided call, without the tensor checks below
    scale = torch.as_tensor(guidance, dtype=torch.float32)
    if scale.ndim not in (0, 1) or (scale.ndim == 1 and scale.shape[0] != b):
        raise InvalidArgumentError(f"guidance must be a float or one value per sample ({b})")
    if not torch.isfinite(scale).all():
        raise InvalidArgumentError(f"guidance scale must be finite, got {scale.tolist()}")
    if bool((scale == 1).all()) and rescale <= 0:
        return denoiser
    if uncond is None:
        raise InvalidArgumentError("guidance != 1 needs `uncond` (the unconditional cond)")
    return CFGDenoiser(denoiser, scale.to(device), uncond, rescale=rescale, interval=interval)


def _prepare_grid(denoiser, grid: list[float], b: int, guided: bool, x: Tensor, device) -> None:
    """Let an adapter with `prepare_grid` compute its per-level inputs once for this call's grid
    (batch b, and 2b for guidance's cond/uncond pair), rather than at each level's first visit."""
    prepare = getattr(denoiser, "prepare_grid", None)
    if prepare is not None:
        prepare(grid, (b, 2 * b) if guided else (b,), x.ndim, device)


def start_for_strength(steps: int, strength: float) -> int:
    """img2img's `start` for a diffusers-style strength in (0, 1]: the last int(steps * strength)
    of `steps` steps run (at least one), as diffusers' img2img `get_timesteps`; 1: all of them."""
    if isinstance(strength, bool) or not isinstance(strength, int | float) or not 0 < strength <= 1:
        raise InvalidArgumentError(f"strength must be in (0, 1], got {strength!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise InvalidArgumentError(f"steps must be an integer >= 1, got {steps!r}")
    return steps - max(1, min(int(steps * strength), steps))


def initial_state(
    noise: PerSampleNoise,
    shape: Sequence[int],
    grid: list[float],
    device: torch.device,
    init: Tensor | None = None,
    start: int = 0,
) -> Tensor:
    """x at sigmas[start]: sigma_0 * z for generation, init + sigmas[start] * z for editing
    (SDEdit, Meng et al. 2022, Sec. 3, in VE form), z from each sample's own generator."""
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= len(grid) - 2:
        raise InvalidArgumentError(
            f"start must be an integer in [0, {len(grid) - 2}] (one step must remain), got {start!r}"
        )
    if init is None:
        if start != 0:
            raise InvalidArgumentError("start > 0 needs `init`, the images to start from")
        return noise.draw(shape, device) * grid[0]
    want = (len(noise.seeds), *shape)
    if tuple(init.shape) != want:
        raise InvalidArgumentError(
            f"init must have shape {want} (one per seed), got {tuple(init.shape)}"
        )
    init = init.to(device=device, dtype=torch.float32)
    if not torch.isfinite(init).all():
        raise InvalidArgumentError("init must be finite")
    return init + noise.draw(shape, device) * grid[start]


def compose_hooks(step_hook: Callback | None, callback: Callback | None) -> Callback | None:
    """step_hook first (it may replace x), then the callback, which sees the hook's x; a tensor
    the callback returns wins, else the hook's."""
    if step_hook is None or callback is None:
        return step_hook or callback

    def both(info: StepInfo) -> Tensor | None:
        x = step_hook(info)
        out = callback(info if x is None else replace(info, x=x))
        return x if out is None else out

    return both


def sample(
    denoiser: Denoiser,
    sigmas: Tensor,
    *,
    shape: Sequence[int],
    seeds: Sequence[int],
    sampler: str = "dpmpp_2m",
    cond: Mapping[str, Tensor] | None = None,
    uncond: Mapping[str, Tensor] | None = None,
    guidance: float | Tensor = 1.0,
    guidance_rescale: float = 0.0,
    guidance_interval: tuple[float, float] = (0.0, math.inf),
    callback: Callback | None = None,
    device: torch.device | str | None = None,
    init: Tensor | None = None,
    start: int = 0,
    step_hook: Callback | None = None,
    resample: tuple[int, int] | None = None,
    **knobs,
) -> SampleResult:
    """Draw len(seeds) samples; sample i depends only on seeds[i] (and its own init), whatever
    the batch.

    Args:
        denoiser: the model, `denoiser(x, sigma, cond) -> x0_hat`.
        sigmas: the grid, e.g. `get_sigmas("karras", 20, process=...)`, ending in 0.
        shape: one sample's shape, e.g. (1, 28, 28).
        seeds: one integer seed per sample.
        sampler: a name in SAMPLERS.
        cond, uncond: per-sample conditioning, and its unconditional counterpart for guidance.
        guidance: classifier-free guidance scale w (1 = conditional), a float or a (B,) tensor.
        guidance_rescale, guidance_interval: see `difforge.core.CFGDenoiser`.
        callback: called after each step with a `StepInfo`; raise SamplingCancelled to stop.
            Its `i` counts the steps of sigmas[start:].
        init: (B, *shape) data-space images to edit (img2img / SDEdit); None: generate.
        start: index into sigmas where editing starts: x = init + sigmas[start] * z, then the
            sampler runs on sigmas[start:] (larger start: closer to init). 0 without init.
        step_hook: called after each step before `callback`; a tensor it returns replaces x
            (e.g. `difforge.core.editing.Inpaint`).
        resample: RePaint's (jump_length, jump_n_sample) (see `difforge.samplers.repaint`),
            re-noising with each sample's own stream 2; None: no resampling. With it, the
            callback's `i` restarts with each downward run.
        **knobs: the sampler's own options (see `sampler_knobs(name)`), e.g. eta for ddim.

    Returns:
        SampleResult with x (float32, (B, *shape)), the NFE and the seeds.
    """
    fn = get_sampler(sampler)
    check_knobs(sampler, knobs)
    grid = sigma_list(sigmas)
    noise = PerSampleNoise(seeds)
    device = CPU if device is None else torch.device(device)
    cond, uncond = _to_device(cond, device), _to_device(uncond, device)
    model = _guided(
        denoiser, guidance, len(noise.seeds), uncond, guidance_rescale, guidance_interval, device
    )
    counter = CountingDenoiser(model)
    x = initial_state(noise, shape, grid, device, init, start)
    run_on = grid if start == 0 else sigma_list(grid[start:])  # checked: samplers skip it
    kwargs = {"cond": cond, "noise": noise, "callback": compose_hooks(step_hook, callback)}
    with torch.no_grad():
        _prepare_grid(denoiser, grid[start:], len(noise.seeds), model is not denoiser, x, device)
        if resample is None:
            x = fn(counter, x, run_on, **kwargs, **knobs)
        else:
            if not isinstance(resample, tuple | list) or len(resample) != 2:
                raise InvalidArgumentError(
                    f"resample must be (jump_length, jump_n_sample), got {resample!r}"
                )
            path = jump_schedule(len(grid) - 1 - start, *resample)
            x = run_with_jumps(
                fn, counter, x, run_on, path, renoise=noise.stream(2), **kwargs, **knobs
            )
    return SampleResult(x=x, nfe=counter.nfe, seeds=tuple(noise.seeds))
