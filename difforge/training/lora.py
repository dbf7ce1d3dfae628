"""LoRA fine-tuning (Hu et al. 2021) of a base model folder on a subset of a data set: the base
stays frozen, only the low-rank adapters that `peft` injects into the target layers train, with
the base's own denoising loss (difforge.training.losses) and noise-level distribution.

The subset is a "writer style" or a class set: `classes` keeps some labels, `stroke` keeps the
thickest (or thinnest) `stroke_fraction` of each class by ink (the fraction of pixels above mid
grey), e.g. an adapter for thick-stroked digits. `difforge train-lora` is the CLI.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from difforge.data import ImageDataset

Stroke = Literal["any", "thick", "thin"]
DEFAULT_TARGETS = ("qkv", "proj", "conv1", "conv2")  # attention and res-block projections


class LoraTrainConfig(BaseModel):
    """A LoRA run: the adapter's shape, the data subset and the optimisation."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "lora"
    rank: int = Field(4, ge=1)  # r of W + (alpha / r) B A
    alpha: float = Field(4.0, gt=0)
    target_modules: tuple[str, ...] = DEFAULT_TARGETS  # peft: module names or name suffixes
    dataset: str | dict[str, Any] = "mnist:train"  # a difforge.data.load_dataset spec
    classes: tuple[int, ...] | None = None  # keep these labels only (None: all)
    stroke: Stroke = "any"  # keep the thickest / thinnest stroke_fraction of each class
    stroke_fraction: float = Field(0.2, gt=0, le=1)
    steps: int = Field(300, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)  # LoRA's usual rate: higher than full fine-tuning
    cond_dropout: float = Field(0.1, ge=0, le=1)  # keep the unconditional branch trained for CFG
    seed: int = Field(0, ge=0)


@dataclass(frozen=True)
class LoraResult:
    folder: Path
    trained_parameters: int
    base_parameters: int
    images: int  # in the training subset
    final_loss: float
    seconds: float

    @property
    def trained_fraction(self) -> float:
        return self.trained_parameters / self.base_parameters


def ink(images: Tensor) -> Tensor:
    """Stroke mass per image: the fraction of pixels above mid grey, uint8 (N, C, H, W) -> (N,)."""
    return (images > 127).float().flatten(1).mean(1)


def select(data: ImageDataset, config: LoraTrainConfig) -> ImageDataset:
    """The training subset: `classes`, then the stroke quantile within each class."""
    keep = torch.ones(len(data), dtype=torch.bool)
    if config.classes is not None:
        keep &= torch.isin(data.labels, torch.tensor(config.classes))
    if config.stroke != "any":
        mass = ink(data.images)
        for c in data.labels[keep].unique().tolist():
            members = keep & (data.labels == c)
            q = config.stroke_fraction if config.stroke == "thin" else 1 - config.stroke_fraction
            cut = torch.quantile(mass[members], q)
            keep &= ~members | ((mass >= cut) if config.stroke == "thick" else (mass <= cut))
    idx = keep.nonzero()[:, 0]
    return ImageDataset(
        f"{data.name}[lora subset]",
        data.images[idx],
        data.labels[idx],
        data.num_classes,
        class_names=data.class_names,
    )


def _objective(model, config: LoraTrainConfig):
    """The base's training objective (process, parameterization, sigma_data) as a TrainConfig."""
    from difforge.training.config import TrainConfig

    c = model.config
    return TrainConfig(
        process=c.process,
        parameterization=c.parameterization,
        sigma_data=c.sigma_data,
        batch_size=config.batch_size,
        seed=config.seed,
    )


def _fit(denoiser, params: list, model, data: ImageDataset, config: LoraTrainConfig) -> float:
    """AdamW on the adapter parameters with the base's denoising loss; the last 50 steps' mean
    loss. Batches, noise levels, noise and CFG dropout come from one generator (config.seed)."""
    from difforge.training.losses import denoising_loss, sample_sigma

    objective, g = _objective(model, config), torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0, foreach=False)
    x_all, fields, spec = data.as_float(), data.fields(), model.spec
    loss_sum, last = 0.0, math.nan
    for step in range(config.steps):
        idx = torch.randint(len(data), (config.batch_size,), generator=g)
        x0 = x_all[idx]  # (B, C, H, W)
        cond = spec.drop(spec.from_batch({k: v[idx] for k, v in fields.items()}), g)
        sigma = sample_sigma(objective, model.process, len(idx), g)  # (B,)
        eps = torch.randn(x0.shape, generator=g)
        loss = denoising_loss(denoiser, x0, sigma, eps, cond, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss_sum += loss.item()
        if (step + 1) % 50 == 0 or step + 1 == config.steps:
            last, loss_sum = loss_sum / ((step % 50) + 1), 0.0
    return last


def train_lora(
    base: str | Path, config: LoraTrainConfig, out: str | Path, data: ImageDataset | None = None
) -> LoraResult:
    """Fine-tune LoRA adapters of the model folder `base` and write the adapter folder `out`.

    Args:
        base: the base model folder (its sha256 is recorded; other bases are refused later).
        config: rank, alpha, targets, data subset and optimisation.
        out: the adapter folder to write.
        data: the data set to draw the subset from (None: `config.dataset`).
    """
    from difforge.nets import count_parameters
    from difforge.pipeline import build_denoiser, load
    from difforge.pipeline.adapters import inject_lora, save_adapter
    from difforge.training.loop import load_training_data

    t0 = time.perf_counter()
    model = load(base)
    data = select(data if data is not None else load_training_data(config.dataset), config)
    base_parameters = count_parameters(model.net)  # before the adapters join it
    net = inject_lora(model.net, config.rank, config.alpha, config.target_modules).train()
    params = [p for n, p in net.named_parameters() if ".lora_" in n]
    for p in params:
        p.requires_grad_(True)
    last = _fit(build_denoiser(model.config, net), params, model, data, config)
    trained = sum(p.numel() for p in params)
    training = {
        **config.model_dump(mode="json"),
        "subset_images": len(data),
        "subset_hash": data.content_hash,
        "final_loss": last,
        "trained_parameters": trained,
        "base_parameters": base_parameters,
    }
    card = _card(model, config, training)
    folder = save_adapter(
        out,
        net,
        name=config.name,
        rank=config.rank,
        alpha=config.alpha,
        target_modules=config.target_modules,
        base_sha256=model.sha256,
        training=training,
        card=card,
    )
    return LoraResult(
        folder,
        trained,
        base_parameters,
        len(data),
        last,
        time.perf_counter() - t0,
    )


def _card(model, config: LoraTrainConfig, training: dict) -> str:
    share = training["trained_parameters"] / training["base_parameters"]
    return (
        f"# {config.name}: a LoRA adapter of {model.name}\n\n"
        f"Base model sha256 `{model.sha256}` (applying it to any other base is refused).\n"
        f"Rank {config.rank}, alpha {config.alpha:g}, targets {', '.join(config.target_modules)}: "
        f"{training['trained_parameters']:,} trained parameters ({100 * share:.2f}% of the "
        f"base's {training['base_parameters']:,}).\n"
        f"Trained {config.steps} steps of batch {config.batch_size} on {config.dataset} "
        f"(classes {config.classes or 'all'}, stroke {config.stroke}, "
        f"{training['subset_images']} images, {training['subset_hash']}); "
        f"final loss {training['final_loss']:.4f}.\n"
    )
