"""difforge.samplers: one pure function per algorithm, a registry, and `sample`.

Every sampler has the signature `fn(denoiser, x, sigmas, *, cond=None, noise=None, callback=None,
**knobs) -> x`, with x the initial noise already scaled to sigmas[0]. No state lives on objects,
so one loaded model serves any number of concurrent calls.
"""

from difforge.core.sigmas import GRID_KINDS, get_sigmas
from difforge.samplers.base import StepInfo
from difforge.samplers.consistency import sample_consistency
from difforge.samplers.ddim import sample_ddim, sample_ddpm
from difforge.samplers.dpmpp import sample_dpmpp_2m, sample_dpmpp_2m_sde
from difforge.samplers.dpmpp3m import sample_dpmpp_3m, sample_dpmpp_3m_sde
from difforge.samplers.euler import sample_euler, sample_euler_ancestral, sample_heun
from difforge.samplers.ipndm import sample_ipndm
from difforge.samplers.multistep import sample_deis, sample_deis_logrho, sample_ipndm_v
from difforge.samplers.noise import GeneratorNoise, NoiseSource, PerSampleNoise, stream_seeds
from difforge.samplers.registry import (
    ALIASES,
    SAMPLERS,
    SampleResult,
    canonical_samplers,
    expected_nfe,
    get_sampler,
    sample,
    sampler_knobs,
    start_for_strength,
)
from difforge.samplers.unipc import sample_unipc, sample_unipc_bh1

__all__ = [
    "ALIASES",
    "GRID_KINDS",
    "SAMPLERS",
    "GeneratorNoise",
    "NoiseSource",
    "PerSampleNoise",
    "SampleResult",
    "StepInfo",
    "canonical_samplers",
    "expected_nfe",
    "get_sampler",
    "get_sigmas",
    "sample",
    "sample_consistency",
    "sample_ddim",
    "sample_ddpm",
    "sample_deis",
    "sample_deis_logrho",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_3m",
    "sample_dpmpp_3m_sde",
    "sample_euler",
    "sample_euler_ancestral",
    "sample_heun",
    "sample_ipndm",
    "sample_ipndm_v",
    "sample_unipc",
    "sample_unipc_bh1",
    "sampler_knobs",
    "start_for_strength",
    "stream_seeds",
]
