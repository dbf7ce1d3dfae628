"""difforge.core: the math. Noise processes, sigma grids, parameterizations, denoisers, guidance,
editing."""

from difforge.core.denoiser import (
    Cond,
    CountingDenoiser,
    Denoiser,
    EDMPrecond,
    ModelDenoiser,
    diffusers_unet_call,
)
from difforge.core.editing import Inpaint, check_mask
from difforge.core.errors import (
    DifforgeError,
    InvalidArgumentError,
    SamplingCancelled,
    UnknownChoiceError,
)
from difforge.core.guidance import CFGDenoiser
from difforge.core.parameterization import PREDICTIONS, Prediction, target, to_x0, x0_loss_weight
from difforge.core.processes import (
    BETA_SCHEDULES,
    DiscreteVP,
    NoiseProcess,
    RectifiedFlow,
    VEProcess,
    append_dims,
    make_betas,
    make_process,
    q_sample,
    snr,
)
from difforge.core.sigmas import GRID_KINDS, get_sigmas, sigmas_from_timesteps, uniform_timesteps

__all__ = [
    "BETA_SCHEDULES",
    "GRID_KINDS",
    "PREDICTIONS",
    "CFGDenoiser",
    "Cond",
    "CountingDenoiser",
    "Denoiser",
    "DifforgeError",
    "DiscreteVP",
    "EDMPrecond",
    "Inpaint",
    "InvalidArgumentError",
    "ModelDenoiser",
    "NoiseProcess",
    "Prediction",
    "RectifiedFlow",
    "SamplingCancelled",
    "UnknownChoiceError",
    "VEProcess",
    "append_dims",
    "check_mask",
    "diffusers_unet_call",
    "get_sigmas",
    "make_betas",
    "make_process",
    "q_sample",
    "sigmas_from_timesteps",
    "snr",
    "target",
    "to_x0",
    "uniform_timesteps",
    "x0_loss_weight",
]
