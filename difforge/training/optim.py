"""AdamW with warmup and a decay schedule, EMA of the weights, and their state as flat tensors.

Optimizer state is flattened into named tensors ("optim.<param index>.<name>") for safetensors and
a JSON-able remainder (param groups), so a checkpoint holds no pickle.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from difforge.core.errors import DifforgeError
from difforge.training.config import TrainConfig

_PREFIX = "optim."


def build_optimizer(params: Iterable[nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW (Loshchilov & Hutter 2019); the single-tensor loop, whose order never changes."""
    opt = config.optim
    return torch.optim.AdamW(
        params,
        lr=lr_at(config, 0),
        betas=opt.betas,
        eps=opt.eps,
        weight_decay=opt.weight_decay,
        foreach=False,
    )


def lr_at(config: TrainConfig, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then the schedule.

    A pure function of the step, so the schedule needs no state of its own in a checkpoint.
    """
    opt = config.optim
    if opt.warmup_steps > 0 and step < opt.warmup_steps:
        return opt.lr * (step + 1) / opt.warmup_steps
    if opt.schedule == "constant":
        return opt.lr
    if opt.schedule == "rsqrt":  # EDM2 (Karras et al. 2024) Eq. 16; min_lr_ratio still floors it
        return opt.lr * max(opt.min_lr_ratio, 1 / math.sqrt(max(1.0, step / opt.decay_steps)))
    progress = min(1.0, (step - opt.warmup_steps) / max(1, config.max_steps - opt.warmup_steps))
    # Cosine decay (Loshchilov & Hutter 2017, SGDR Eq. 5, without restarts), or linear.
    scale = 0.5 * (1 + math.cos(math.pi * progress)) if opt.schedule == "cosine" else 1 - progress
    return opt.lr * (opt.min_lr_ratio + (1 - opt.min_lr_ratio) * scale)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, JSON) that `load_optimizer_state` turns back into the same optimizer state."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"{_PREFIX}{index}.{name}"] = value.detach().clone().contiguous()
            else:
                scalars[f"{index}.{name}"] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
        for g in sd["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def load_optimizer_state(
    opt: torch.optim.Optimizer, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]
) -> None:
    """Restore what `optimizer_state` saved; the parameter count must match."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(_PREFIX):
            index, name = key[len(_PREFIX) :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta.get("scalars", {}).items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = [
        {k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]
    ]
    try:
        opt.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise DifforgeError(f"checkpoint optimizer state does not fit this model: {e}") from None


class EMA:
    """An exponential moving average of a network's weights, kept as a frozen copy of the net."""

    def __init__(self, net: nn.Module):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, net: nn.Module, beta: float) -> None:
        """ema <- beta * ema + (1 - beta) * weights; buffers are copied."""
        for e, p in zip(self.net.parameters(), net.parameters(), strict=True):
            e.lerp_(p.detach(), 1.0 - beta)
        for e, b in zip(self.net.buffers(), net.buffers(), strict=True):
            e.copy_(b)


def ema_beta(config: TrainConfig, images_seen: int) -> float:
    """Per-step EMA decay from a half-life in images, ramped up early (Karras et al. 2022, App. C).

    beta = 0.5 ** (batch / h), h = min(halflife_images, rampup_ratio * images_seen).
    """
    h = config.ema.halflife_images
    if config.ema.rampup_ratio is not None:
        h = min(h, images_seen * config.ema.rampup_ratio)
    return 0.5 ** (config.batch_size / max(h, 1e-8))
