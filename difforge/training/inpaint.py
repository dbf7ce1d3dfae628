"""A mask-conditioned inpainting model, fine-tuned from a pixel-space base model folder.

The base's U-Net gets `1 + C` extra input channels (the mask and the known pixels, the spec's
`masked_image` key, difforge.pipeline.conditioning.MaskedImageKey), concatenated to x before
conv_in. conv_in is widened with the new input channels' weights at zero, so at step 0 the
model computes exactly what the base did and only learns to read the mask (the recipe of
Stable Diffusion's inpainting fine-tune, Rombach et al. 2022, Sec. 4.5). Training draws a random
mask per image (halves, rectangles, brush strokes), makes `mask_dropout` of them null (nothing
known: plain generation still works) and keeps the base's class dropout for guidance; the loss,
noise levels and parameterization are the base's. The result is a v2 pipeline folder whose
spec holds the base's keys plus the masked_image key. `difforge train-inpaint` is the CLI.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.data import ImageDataset
from difforge.pipeline.conditioning import MaskShape


class InpaintTrainConfig(BaseModel):
    """A fine-tuning run of a base model into a mask-conditioned inpainting model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "inpaint"
    dataset: str | dict[str, Any] = "mnist:train"  # a difforge.data.load_dataset spec
    masks: tuple[MaskShape, ...] = ("half", "rectangle", "strokes")
    mask_dropout: float = Field(0.1, ge=0, le=1)  # P(row -> nothing known)
    steps: int = Field(600, ge=1)
    batch_size: int = Field(32, ge=1)
    lr: float = Field(2e-4, gt=0)
    ema_decay: float = Field(0.995, ge=0, lt=1)  # per step; the EMA weights are exported
    max_minutes: float | None = Field(None, gt=0)  # stop early (at a step boundary) past this
    seed: int = Field(0, ge=0)


@dataclass(frozen=True)
class InpaintResult:
    folder: Path
    steps: int
    final_loss: float
    seconds: float


def widen_conv_in(weights: dict[str, Tensor], extra: int) -> dict[str, Tensor]:
    """The base's state dict with conv_in taking `extra` more input channels, their weights 0."""
    w = weights["conv_in.weight"]  # (out, in, k, k)
    zeros = torch.zeros(w.shape[0], extra, *w.shape[2:], dtype=w.dtype)
    return {**weights, "conv_in.weight": torch.cat([w, zeros], dim=1)}


def inpaint_parts(base):
    """(inpainting ModelConfig, its masked_image key, initial weights) from a loaded base Model."""
    from difforge.nets import UNetConfig
    from difforge.pipeline.conditioning import MaskedImageKey

    if base.vae is not None or base.config.net.kind != "unet" or len(base.image_shape) != 3:
        raise InvalidArgumentError("train-inpaint fine-tunes a pixel-space 2-D U-Net model")
    if any(k.kind == "masked_image" for k in base.spec.keys):
        raise InvalidArgumentError(f"{base.name} already takes a masked image")
    key = MaskedImageKey(image_shape=tuple(base.image_shape))
    net_cfg = UNetConfig.from_dict({**base.config.net.config, "inpaint_channels": key.channels})
    config = base.config.model_copy(
        update={"net": base.config.net.model_copy(update={"config": net_cfg.to_dict()})}
    )
    weights = widen_conv_in(dict(base.net.state_dict()), key.channels)
    return config, key, weights


def _fit(net, model_config, process, spec, data: ImageDataset, config: InpaintTrainConfig):
    """AdamW on every weight with the base's loss; returns (EMA net, steps, last-50 mean loss)."""
    from difforge.pipeline import build_denoiser
    from difforge.training.config import TrainConfig
    from difforge.training.losses import denoising_loss, sample_sigma
    from difforge.training.optim import EMA

    c = model_config
    objective = TrainConfig(
        process=c.process,
        parameterization=c.parameterization,
        sigma_data=c.sigma_data,
        batch_size=config.batch_size,
        seed=config.seed,
    )
    denoiser, ema = build_denoiser(c, net.train()), EMA(net)
    g = torch.Generator().manual_seed(config.seed)
    opt = torch.optim.AdamW(net.parameters(), lr=config.lr, weight_decay=0.0, foreach=False)
    x_all, fields = data.as_float(), data.fields()
    t0, losses, done = time.perf_counter(), [], 0
    while done < config.steps:
        idx = torch.randint(len(data), (config.batch_size,), generator=g)
        x0 = x_all[idx]  # (B, C, H, W)
        batch = {"images": x0, **{k: v[idx] for k, v in fields.items()}}
        cond = spec.drop(spec.from_batch(batch), g)  # masks drawn here; CFG dropout
        sigma = sample_sigma(objective, process, len(idx), g)  # (B,)
        eps = torch.randn(x0.shape, generator=g)
        loss = denoising_loss(denoiser, x0, sigma, eps, cond, objective)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)  # as the base's recipe
        opt.step()
        ema.update(net, config.ema_decay)
        losses, done = [*losses, loss.item()][-50:], done + 1
        if config.max_minutes and time.perf_counter() - t0 > 60 * config.max_minutes:
            break
    return ema.net, done, sum(losses) / max(len(losses), 1)


def train_inpaint(
    base: str | Path, config: InpaintTrainConfig, out: str | Path, data: ImageDataset | None = None
) -> InpaintResult:
    """Fine-tune the pixel model folder `base` into an inpainting model folder `out` (v2).

    Args:
        base: the base model folder (a pixel-space U-Net).
        config: masks, dropout and optimisation.
        out: the pipeline folder to write.
        data: the training images (None: `config.dataset`).
    """
    from difforge.nets import build_net
    from difforge.pipeline import ConditioningSpec, load, save_pipeline
    from difforge.pipeline.artifact import code_version
    from difforge.training.loop import load_training_data

    t0 = time.perf_counter()
    model = load(base)
    model_config, key, weights = inpaint_parts(model)
    key = key.model_copy(update={"masks": config.masks, "dropout": config.mask_dropout})
    spec = ConditioningSpec(keys=(*model.spec.keys, key))
    net = build_net(model_config.net.kind, model_config.net.config)
    net.load_state_dict(weights, strict=True)
    data = data if data is not None else load_training_data(config.dataset)
    ema_net, steps, loss = _fit(net, model_config, model.process, spec, data, config)
    seconds = time.perf_counter() - t0
    provenance = {
        "base": model.name,
        "base_sha256": model.sha256,
        "dataset": config.dataset if isinstance(config.dataset, str) else "(dict)",
        "dataset_hash": data.content_hash,
        "steps": steps,
        "step": steps,  # the key `difforge info` reads
        "images_seen": steps * config.batch_size,
        "final_loss": loss,
        "train_seconds": round(seconds, 1),
        "training": config.model_dump(mode="json"),
        "code_version": code_version(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    denoiser_config = model_config.model_copy(update={"name": config.name})
    pipeline = {
        "name": config.name,
        "conditioning": spec,
        "sampling": model.sampling,
        "image_shape": tuple(model.image_shape),
        "provenance": provenance,
    }
    card = _card(model, config, provenance)
    weights = {k: v.detach().clone() for k, v in ema_net.state_dict().items()}
    folder = save_pipeline(out, pipeline, {"denoiser": (denoiser_config, weights)}, card)
    return InpaintResult(folder, steps, loss, seconds)


def _card(model, config: InpaintTrainConfig, provenance: dict) -> str:
    return (
        f"# {config.name}: a mask-conditioned inpainting model\n\n"
        f"Fine-tuned from {model.name} (sha256 `{model.sha256}`): its U-Net takes the mask and "
        "the known pixels as extra input channels (conv_in widened, new weights started at 0).\n"
        f"Trained {provenance['steps']} steps of batch {config.batch_size} (lr {config.lr:g}, "
        f"EMA {config.ema_decay}) on {provenance['dataset']} ({provenance['dataset_hash']}) "
        f"with random masks ({', '.join(config.masks)}; {config.mask_dropout:.0%} null), in "
        f"{provenance['train_seconds']:.0f} s; final loss {provenance['final_loss']:.4f}.\n\n"
        "Sample it like any model; with `init_image` and `mask` the mask and the known pixels "
        "condition the net and the known region is also re-imposed, so it is kept to the byte.\n"
    )
