"""Training the pipeline's VAE: a KL autoencoder (Rombach et al. 2022, Sec. 3 and App. G) with an
L1 or L2 reconstruction loss plus a small KL weight, then its latent scaling factor.

loss = recon(x, D(z)) + kl_weight * KL(q(z|x) || N(0, I)) / (C * H * W),  z = mean + std * eps.
The KL is a sum over latent dimensions divided by the pixel count, so `kl_weight` is on the scale
of a per-pixel reconstruction error. No perceptual loss: it would need a downloaded network.

The result is a VAE component folder (config.json = VAEConfig with `scaling_factor` = 1 / std of
the latent means over the training scenes, model.safetensors, README.md, manifest.json) that a
latent denoiser's TrainConfig names by path (`vae`).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.data.dataset import ImageDataset
from difforge.nets import build_net, count_parameters
from difforge.nets.autoencoder import Autoencoder, kl_divergence, reconstruction_loss
from difforge.pipeline import NetSpec, VAEConfig, code_version
from difforge.pipeline.artifact import save_component


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class VAETrainConfig(_Frozen):
    """Everything that determines a VAE training run (CPU-deterministic for a fixed step count)."""

    net: NetSpec = Field(
        default_factory=lambda: NetSpec(
            kind="autoencoder",
            config={"image_size": 64, "latent_channels": 4, "base_channels": 16,
                    "channel_mults": [1, 2, 4], "norm_groups": 8},
        )
    )  # fmt: skip
    dataset: str | dict[str, Any] = "scenes:train"  # a `difforge.data.load_dataset` spec
    recon: Literal["l1", "l2"] = "l1"  # reconstruction error (per pixel, mean)
    kl_weight: float = Field(1e-4, ge=0)  # on KL / (C*H*W); "small" as LDM's f4 KL models
    lr: float = Field(1e-3, gt=0)  # Adam, constant after a linear warmup
    warmup_steps: int = Field(50, ge=0)
    batch_size: int = Field(32, ge=1)
    max_steps: int = Field(2000, ge=1)
    seed: int = Field(0, ge=0)
    log_every: int = Field(25, ge=1)
    scale_images: int = Field(5000, ge=1)  # training scenes the scaling factor is measured on
    init: str | None = None  # a VAE folder to start from (its sha256 is recorded); None: random

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def vae_loss(
    vae: Autoencoder, x: Tensor, eps: Tensor, recon: str, kl_weight: float
) -> tuple[Tensor, dict[str, float]]:
    """The KL-autoencoder objective on one batch x (B, C, H, W) in [-1, 1] with noise eps."""
    mean, logvar = vae.encode(x)  # (B, c, h, w) each
    z = mean + (0.5 * logvar).exp() * eps  # reparameterisation (Kingma & Welling 2014)
    x_hat = vae.decode(z)
    rec = reconstruction_loss(x, x_hat, recon).mean()
    kl = kl_divergence(mean, logvar).mean() / x[0].numel()
    return rec + kl_weight * kl, {"recon": rec.item(), "kl": kl.item()}


@torch.no_grad()
def encode_means(vae: Autoencoder, x: Tensor, batch_size: int = 250) -> Tensor:
    """The latent means of images x (N, C, H, W) in [-1, 1]: (N, *latent_shape)."""
    vae.eval()
    return torch.cat([vae.encode(x[i : i + batch_size])[0] for i in range(0, len(x), batch_size)])


def scaling_factor(latents: Tensor) -> float:
    """1 / std of the latents over every element (Rombach et al. 2022, Sec. 4.3.2 / App. G)."""
    return float(1.0 / latents.float().std())


def _lr(cfg: VAETrainConfig, step: int) -> float:
    return cfg.lr * min(1.0, (step + 1) / max(cfg.warmup_steps, 1))


def _build_vae(config: VAETrainConfig) -> tuple[Autoencoder, str | None]:
    """The autoencoder, seeded, optionally warm-started: (net, init weights sha256 or None)."""
    torch.manual_seed(config.seed)
    vae = build_net(config.net.kind, config.net.config)
    if not isinstance(vae, Autoencoder):
        raise InvalidArgumentError(f"a VAE needs net kind 'autoencoder', got {config.net.kind!r}")
    if not config.init:
        return vae, None
    from difforge.pipeline.artifact import load_component

    _, _, init_sha, weights = load_component(config.init, "vae")
    vae.load_state_dict(weights, strict=True)
    return vae, init_sha


def _fit(
    vae: Autoencoder,
    x_all: Tensor,
    config: VAETrainConfig,
    metrics: Path,
    max_minutes: float | None,
    log: Callable[[str], None],
) -> tuple[int, dict[str, Any], float]:
    """Adam on the VAE objective until max_steps or the budget: (steps, last metrics, seconds)."""
    opt = torch.optim.Adam(vae.parameters(), lr=config.lr)
    gen = torch.Generator().manual_seed(config.seed)
    metrics.parent.mkdir(parents=True, exist_ok=True)
    metrics.write_text("")
    start, step, pos, last = time.monotonic(), 0, 0, {}
    perm = torch.randperm(len(x_all), generator=gen)
    while step < config.max_steps:
        if max_minutes is not None and time.monotonic() - start > 60 * max_minutes:
            break
        if pos + config.batch_size > len(x_all):
            perm, pos = torch.randperm(len(x_all), generator=gen), 0
        x = x_all[perm[pos : pos + config.batch_size]]
        pos += config.batch_size
        for group in opt.param_groups:
            group["lr"] = _lr(config, step)
        vae.train()
        eps = torch.randn((x.shape[0], *vae.config.latent_shape), generator=gen)
        loss, parts = vae_loss(vae, x, eps, config.recon, config.kl_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        last = {"step": step, "loss": loss.item(), **parts, "time": time.monotonic() - start}
        if step % config.log_every == 0:
            with open(metrics, "a") as f:
                f.write(json.dumps(last) + "\n")
            log(f"vae step {step}: loss {loss.item():.4f} recon {parts['recon']:.4f}")
    return step, last, time.monotonic() - start


def train_vae(
    config: VAETrainConfig,
    out: str | Path,
    *,
    dataset: ImageDataset | None = None,
    max_minutes: float | None = None,
    log: Callable[[str], None] = lambda m: print(m, file=sys.stderr),
) -> dict[str, Any]:
    """Train a VAE, measure its scaling factor and write the component folder `out`.

    Args:
        config: the recipe.
        out: the VAE folder to write (replaced if present); metrics.jsonl goes beside it.
        dataset: use this dataset instead of loading `config.dataset` (its hash is recorded).
        max_minutes: wall-clock budget; training stops early, the folder is still written.

    Returns:
        A summary: steps, final losses, scaling factor, seconds, the folder path.
    """
    from difforge.data import load_dataset

    data = dataset if dataset is not None else load_dataset(config.dataset)
    if not isinstance(data, ImageDataset):
        raise InvalidArgumentError(f"dataset {config.dataset!r} is not an image dataset")
    x_all = data.as_float()  # (N, C, H, W)
    vae, init_sha = _build_vae(config)
    out = Path(out)
    metrics = out.with_name(out.name + "-metrics.jsonl")
    step, last, seconds = _fit(vae, x_all, config, metrics, max_minutes, log)
    scale = scaling_factor(encode_means(vae, x_all[: config.scale_images]))
    provenance = {
        "dataset": config.dataset,
        "dataset_hash": data.content_hash,
        "dataset_size": len(data),
        "steps": step,
        "images_seen": step * config.batch_size,
        "final_loss": last.get("loss"),
        "final_recon": last.get("recon"),
        "scaling_images": min(config.scale_images, len(x_all)),
        "init_sha256": init_sha,
        "parameters": count_parameters(vae),
        "train_seconds": round(seconds, 1),
        "code_version": code_version(),
        "config": config.model_dump(mode="json"),
    }
    vae_config = VAEConfig(
        net=config.net,
        scaling_factor=scale,
        image_shape=tuple(data.images.shape[1:]),
        latent_shape=vae.config.latent_shape,
        provenance=provenance,
    )
    save_component(out, vae_config, vae.state_dict(), _card(vae_config, provenance))
    return {"folder": str(out), "steps": step, "scaling_factor": scale, "seconds": seconds, **last}


def _card(cfg: VAEConfig, p: dict[str, Any]) -> str:
    recon = p["final_recon"]
    return f"""# VAE ({cfg.net.kind})

A KL autoencoder trained with `difforge train-vae`: {tuple(cfg.image_shape)} pixels ->
{tuple(cfg.latent_shape)} latents, {p["parameters"]:,} parameters.

| field | value |
|---|---|
| dataset | `{json.dumps(p["dataset"])}` ({p["dataset_size"]} images, `{p["dataset_hash"]}`) |
| steps | {p["steps"]} ({p["images_seen"]:,} images) in {p["train_seconds"]} s |
| final reconstruction loss | {"n/a" if recon is None or math.isnan(recon) else f"{recon:.4f}"} |
| scaling factor | {cfg.scaling_factor:.5f} (1 / std of latent means over {p["scaling_images"]} scenes) |
| code version | `{p["code_version"]}` |
"""


@dataclass(frozen=True)
class LatentSource:
    """A trained VAE and the scaled latents of one dataset: what a latent denoiser trains on."""

    config: VAEConfig
    weights: dict[str, Tensor]  # the VAE's state dict, saved again as the pipeline's vae/
    sha256: str  # of its model.safetensors: the denoiser's recorded base
    latents: Tensor  # (N, *latent_shape) float32, = scaling_factor * encoder mean
    seconds: float  # spent encoding (0 when read from the cache)


def read_vae_config(folder: str | Path) -> VAEConfig:
    """The VAEConfig of a VAE folder (no weights read, no verification: for shapes only)."""
    from difforge.pipeline.artifact import CONFIG_FILE, read_config

    return read_config(Path(folder) / CONFIG_FILE, VAEConfig)


def _cache_dir() -> Path:
    return Path(os.environ.get("DIFFORGE_CACHE", Path.home() / ".cache" / "difforge")) / "latents"


def encoded_dataset(folder: str | Path, dataset: ImageDataset) -> LatentSource:
    """Load the VAE in `folder` (verified, strict) and encode `dataset` once.

    The latents are cached under $DIFFORGE_CACHE/latents (default ~/.cache/difforge), keyed by
    the VAE's weights sha256 and the dataset's content hash, so a second run reads them back.
    """
    from safetensors.torch import load_file, save_file

    from difforge.pipeline.artifact import load_component

    config, vae, sha, weights = load_component(folder, "vae")
    if tuple(config.image_shape) != tuple(dataset.images.shape[1:]):
        raise InvalidArgumentError(
            f"the VAE in {folder} encodes {tuple(config.image_shape)} images, but the dataset "
            f"has {tuple(dataset.images.shape[1:])}"
        )
    # A captioned data set names the hash of its pixels alone (`images_hash`): same latents.
    pixels = getattr(dataset, "images_hash", "") or dataset.content_hash
    key = f"{sha[:20]}-{pixels.removeprefix('sha256:')[:20]}.safetensors"
    path = _cache_dir() / key
    if path.is_file():
        return LatentSource(config, weights, sha, load_file(str(path))["latents"], 0.0)
    start = time.monotonic()
    latents = encode_means(vae, dataset.as_float()) * config.scaling_factor  # (N, c, h, w)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp-{os.getpid()}")
    save_file({"latents": latents.contiguous()}, str(tmp))
    os.replace(tmp, path)
    return LatentSource(config, weights, sha, latents, time.monotonic() - start)
