"""The sampler registry (name -> pure function) and `sample`, the one call that runs a sampler
with per-sample seeds, guidance and NFE counting."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from difforge.core.denoiser import CountingDenoiser, Denoiser
from difforge.core.errors import InvalidArgumentError, UnknownChoiceError, check_choice
from difforge.core.guidance import CFGDenoiser
from difforge.samplers.base import Callback, sigma_list
from difforge.samplers.ddim import sample_ddim, sample_ddpm
from difforge.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from difforge.samplers.dpmpp3m import sample_dpmpp_3m, sample_dpmpp_3m_sde
from difforge.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from difforge.samplers.ipndm import sample_ipndm
from difforge.samplers.multistep import sample_deis, sample_deis_logrho, sample_ipndm_v
from difforge.samplers.noise import PerSampleNoise
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
}

# Denoiser evaluations per call for a grid of `steps` levels ending in sigma = 0.
_EVALS_PER_STEP = {name: 1 for name in SAMPLERS} | {"heun": 2}

_RESERVED = ("cond", "noise", "callback")


def get_sampler(name: str) -> SamplerFn:
    check_choice("sampler", name, SAMPLERS)
    return SAMPLERS[name]


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
    **knobs,
) -> SampleResult:
    """Draw len(seeds) samples; sample i depends only on seeds[i], whatever the batch.

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
        **knobs: the sampler's own options (see `sampler_knobs(name)`), e.g. eta for ddim.

    Returns:
        SampleResult with x (float32, (B, *shape)), the NFE and the seeds.
    """
    fn = get_sampler(sampler)
    check_knobs(sampler, knobs)
    grid = sigma_list(sigmas)
    noise = PerSampleNoise(seeds)
    b = len(noise.seeds)
    device = torch.device(device) if device is not None else torch.device("cpu")
    scale = torch.as_tensor(guidance, dtype=torch.float32)
    if scale.ndim not in (0, 1) or (scale.ndim == 1 and scale.shape[0] != b):
        raise InvalidArgumentError(f"guidance must be a float or one value per sample ({b})")
    if not torch.isfinite(scale).all():
        raise InvalidArgumentError(f"guidance scale must be finite, got {scale.tolist()}")
    cond, uncond = _to_device(cond, device), _to_device(uncond, device)
    model = denoiser
    if not bool((scale == 1).all()) or guidance_rescale > 0:
        if uncond is None:
            raise InvalidArgumentError("guidance != 1 needs `uncond` (the unconditional cond)")
        model = CFGDenoiser(
            denoiser,
            scale.to(device),
            uncond,
            rescale=guidance_rescale,
            interval=guidance_interval,
        )
    counter = CountingDenoiser(model)
    x = noise.draw(shape, device) * grid[0]
    with torch.no_grad():
        x = fn(counter, x, sigmas, cond=cond, noise=noise, callback=callback, **knobs)
    return SampleResult(x=x, nfe=counter.nfe, seeds=tuple(noise.seeds))
