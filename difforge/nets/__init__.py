"""difforge.nets: denoiser architectures, `forward(x, c_noise, cond)`, built by name from a JSON config."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.nets.autoencoder import Autoencoder, AutoencoderConfig
from difforge.nets.dit import DiT, DiTConfig
from difforge.nets.layout import LayoutPlanner, LayoutPlannerConfig
from difforge.nets.text_encoder import (
    TextConditionedConfig,
    TextConditionedNet,
    TextEncoder,
    TextEncoderConfig,
)
from difforge.nets.unet import MNIST_UNET, UNet, UNetConfig
from difforge.nets.unet1d import UNet1D, UNet1DConfig

# Denoisers take forward(x, c_noise, cond); the autoencoder has encode/decode (a pipeline VAE);
# the layout planner has logits/sample (a pipeline's text-to-layout stage, nets/layout.py).
# "text_conditioned" = a text encoder in front of a backbone (one of BACKBONES); "unet1d" works
# on series (C, T).
NET_KINDS: tuple[str, ...] = (
    "unet",
    "unet1d",
    "dit",
    "text_conditioned",
    "autoencoder",
    "layout_planner",
)
BACKBONES: tuple[str, ...] = ("unet", "dit")
_CONFIGS = {
    "unet": UNetConfig,
    "unet1d": UNet1DConfig,
    "dit": DiTConfig,
    "text_conditioned": TextConditionedConfig,
    "autoencoder": AutoencoderConfig,
    "layout_planner": LayoutPlannerConfig,
}
_NETS = {
    "unet": UNet,
    "unet1d": UNet1D,
    "dit": DiT,
    "text_conditioned": TextConditionedNet,
    "autoencoder": Autoencoder,
    "layout_planner": LayoutPlanner,
}

NetConfig = (
    UNetConfig
    | UNet1DConfig
    | DiTConfig
    | TextConditionedConfig
    | AutoencoderConfig
    | LayoutPlannerConfig
)


def net_config_from_dict(kind: str, config: Mapping[str, Any]) -> NetConfig:
    """The typed config of net `kind` from its JSON dict (unknown keys are refused).

    Args:
        kind: one of NET_KINDS.
        config: e.g. `UNetConfig.to_dict()`.

    Returns:
        The frozen config dataclass.
    """
    check_choice("net kind", kind, NET_KINDS)
    return _CONFIGS[kind].from_dict(config)


def build_net(kind: str, config: Mapping[str, Any] | NetConfig) -> nn.Module:
    """A freshly initialised network of `kind` (one of NET_KINDS) from a config dict or dataclass.

    The net carries `.kind` and `.config` (with `.config.to_dict()`), enough to rebuild it.
    """
    check_choice("net kind", kind, NET_KINDS)
    if isinstance(config, Mapping):
        config = net_config_from_dict(kind, config)
    elif not isinstance(config, _CONFIGS[kind]):
        raise InvalidArgumentError(
            f"a {kind} net needs a dict or {_CONFIGS[kind].__name__}, got {type(config).__name__}"
        )
    return _NETS[kind](config)


def count_parameters(net: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameter values in `net` (all, or only those with requires_grad)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def _sdpa_flops(q_shape, k_shape, v_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV matmuls, 2 flops per multiply-add (the formula torch uses for GPU kernels)."""
    b, h, s_q, d = q_shape
    s_k, d_v = k_shape[2], v_shape[3]
    return 2 * b * h * s_q * s_k * (d + d_v)


# torch's counter has no formula for the CPU attention kernel; without this, attention counts 0.
_CUSTOM_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def flops_per_forward(
    net: nn.Module, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor] | None = None
) -> int:
    """Floating-point operations of one forward pass on this batch (matmuls, convs, attention).

    Counted by torch.utils.flop_counter (2 per multiply-add); elementwise ops, norms and
    activations are not counted. Runs the net once under no_grad.
    """
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_CUSTOM_FLOPS) as counter:
        net(x, c_noise, cond)
    return int(counter.get_total_flops())


__all__ = [
    "BACKBONES",
    "MNIST_UNET",
    "NET_KINDS",
    "Autoencoder",
    "AutoencoderConfig",
    "DiT",
    "DiTConfig",
    "LayoutPlanner",
    "LayoutPlannerConfig",
    "NetConfig",
    "TextConditionedConfig",
    "TextConditionedNet",
    "TextEncoder",
    "TextEncoderConfig",
    "UNet",
    "UNet1D",
    "UNet1DConfig",
    "UNetConfig",
    "build_net",
    "count_parameters",
    "flops_per_forward",
    "net_config_from_dict",
]
