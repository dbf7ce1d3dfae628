"""Training noise levels, loss weightings and the denoising loss, all through one VE sigma.

The loss is an x0-space weighted regression written in the network's own terms:

    loss = mean_i  lambda(sigma_i) / w(sigma_i) * mean ||F_i - target_i||^2

where `denoiser.loss_terms` gives the network output F, its target and w(sigma) = 1 / c_out^2 (so
that ||F - target||^2 = w ||x0_hat - x0||^2), and lambda is the x0-space weighting chosen here. The
adapter is the only place that knows what the network predicts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.core.denoiser import Cond
from difforge.core.errors import check_choice
from difforge.core.processes import DiscreteVP, NoiseProcess
from difforge.training.config import TrainConfig

NOISE_DISTRIBUTIONS: tuple[str, ...] = ("uniform_t", "log_normal", "logit_normal")
LOSS_WEIGHTINGS: tuple[str, ...] = ("native", "min_snr", "edm")


def sample_sigma(
    config: TrainConfig, process: NoiseProcess, n: int, generator: torch.Generator
) -> Tensor:
    """n training noise levels, float32 (n,), drawn from `config.noise_distribution`."""
    kind = config.noise_distribution
    check_choice("noise distribution", kind, NOISE_DISTRIBUTIONS)
    if kind == "uniform_t":
        sigma = _uniform_t_sigma(process, n, generator)
    elif kind == "log_normal":
        # ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Sec. 5, "Loss weighting and sampling").
        rnd = torch.randn(n, generator=generator, dtype=torch.float64)
        sigma = (rnd * config.P_std + config.P_mean).exp()
    else:
        # t = sigmoid(u), u ~ N(m, s^2) (Esser et al. 2024, Eq. 19); sigma = t / (1 - t) = e^u.
        rnd = torch.randn(n, generator=generator, dtype=torch.float64)
        t = torch.sigmoid(rnd * config.logit_std + config.logit_mean)
        sigma = process.t_to_sigma(t.clamp(max=1 - 1e-7))
    if process.kind != "ve":
        # VP and flow networks only know their own range of t; VE/EDM takes any sigma > 0.
        sigma = sigma.clamp(process.sigma_min, process.sigma_max)
    return sigma.float()


def _uniform_t_sigma(process: NoiseProcess, n: int, generator: torch.Generator) -> Tensor:
    if isinstance(process, DiscreteVP):
        # t ~ U{0, ..., T-1} (Ho et al. 2020, Alg. 1).
        t = torch.randint(0, process.num_timesteps, (n,), generator=generator)
        return process.sigmas[t]
    t_lo = float(process.sigma_to_t(torch.tensor(process.sigma_min)))
    t_hi = float(process.sigma_to_t(torch.tensor(process.sigma_max)))
    u = torch.rand(n, generator=generator, dtype=torch.float64)
    return process.t_to_sigma(t_lo + u * (t_hi - t_lo))


def x0_weighting(config: TrainConfig, sigma: Tensor, native: Tensor) -> Tensor:
    """lambda(sigma): the loss weight in x0 space, float32 (B,).

    Args:
        config: gives `loss_weighting`, `min_snr_gamma` and `sigma_data`.
        sigma: (B,) noise levels.
        native: (B,) the adapter's own x0-space weight 1 / c_out^2 (the "native" choice).
    """
    kind = config.loss_weighting
    check_choice("loss weighting", kind, LOSS_WEIGHTINGS)
    sigma = sigma.double()
    if kind == "native":
        return native.float()
    if kind == "min_snr":
        # Min-SNR-gamma (Hang et al. 2023, Eq. 9): min(SNR, gamma) with SNR = 1 / sigma^2.
        return sigma.pow(-2).clamp(max=config.min_snr_gamma).float()
    return edm_lambda(sigma, config.sigma_data).float()


def edm_lambda(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2 (Karras et al. 2022, Eq. 8 /
    Tab. 1), in sigma's dtype."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def denoising_loss(
    denoiser, x0: Tensor, sigma: Tensor, eps: Tensor, cond: Cond, config: TrainConfig
) -> Tensor:
    """The weighted denoising loss of one batch, a float32 scalar.

    Args:
        denoiser: an adapter with `loss_terms(x0, sigma, eps, cond) -> (out, target, w)`.
        x0: (B, C, H, W) clean data; sigma: (B,); eps: like x0, standard normal.
        cond: per-sample conditioning (the batched cond of the model's ConditioningSpec).
    """
    out, target, native = denoiser.loss_terms(x0, sigma, eps, cond)
    native = torch.as_tensor(native, device=x0.device).float().expand(x0.shape[0])
    if config.loss_weighting == "native":
        factor = torch.ones_like(native)  # lambda = w exactly; no round-off from w / w
    else:
        factor = x0_weighting(config, sigma, native) / native
    per_sample = (out.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (factor * per_sample).mean()
