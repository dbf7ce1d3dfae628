"""What a training run leaves behind besides checkpoints: the model folder, its card, the loss
curve and sample grids."""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from torch import Tensor

from difforge.common.atomic import write_text_atomic
from difforge.core.errors import InvalidArgumentError
from difforge.data.dataset import ImageDataset
from difforge.data.scenes import EMPTY
from difforge.data.timeseries import SeriesDataset
from difforge.pipeline import (
    ConditioningSpec,
    Model,
    ModelConfig,
    PipelineConfig,
    code_version,
    save_model,
    save_pipeline,
    save_samples_png,
)
from difforge.pipeline.conditioning import SlotsKey, TextKey
from difforge.training.config import TrainConfig


def text_spec(config: TrainConfig, dataset: ImageDataset) -> ConditioningSpec | None:
    """The text conditioning of a captioned data set (None for other data sets)."""
    tokenizer = getattr(dataset, "tokenizer", "")
    if not tokenizer:
        return None
    key = TextKey(
        tokenizer=tokenizer,
        max_tokens=dataset.max_tokens,
        examples=tuple(dataset.examples),
        dropout=config.cond_dropout,
    )
    if not config.layout:
        return ConditioningSpec(keys=(key,))
    slots = getattr(dataset, "slots", None)
    if slots is None:
        raise InvalidArgumentError("a layout planner needs a data set with slots (scene_captions)")
    planned = SlotsKey(
        num_slots=slots.shape[1], num_classes=EMPTY, dropout=config.cond_dropout, planned=True
    )  # the scenes' classes 0 .. EMPTY - 1 and the EMPTY token
    return ConditioningSpec(keys=(key, planned), dropout_all=config.cond_dropout)


def check_text_net(net_config: Any, spec: ConditioningSpec | None) -> None:
    """A text model's encoder must cover the tokenizer's vocabulary and prompt length."""
    from difforge.data.tokenizer import tokenizer_from_json

    if spec is None:
        return
    encoder = getattr(net_config, "encoder", None)
    if encoder is None:
        raise InvalidArgumentError("a captioned data set needs net kind 'text_conditioned'")
    key = spec.keys[0]
    vocab = tokenizer_from_json(key.tokenizer).vocab_size
    if encoder["vocab_size"] < vocab or encoder["max_tokens"] != key.max_tokens:
        raise InvalidArgumentError(
            f"text encoder has vocab_size {encoder['vocab_size']} and max_tokens "
            f"{encoder['max_tokens']}; the data set's tokenizer needs vocab_size >= {vocab} and "
            f"max_tokens {key.max_tokens}"
        )


def training_pipeline(model_config: ModelConfig, spec: ConditioningSpec) -> PipelineConfig:
    """A one-component pipeline around `model_config` with the text spec (for sample grids)."""
    return PipelineConfig(
        name=model_config.name,
        components={"denoiser": {"path": "denoiser", "sha256": "(training)"}},
        conditioning=spec,
        sampling=model_config.sampling,
        image_shape=model_config.image_shape,
    )


def model_config_for(
    config: TrainConfig, dataset: ImageDataset | SeriesDataset, name: str
) -> ModelConfig:
    """The ModelConfig of a network trained under `config` on `dataset` (images or series)."""
    captioned = bool(getattr(dataset, "tokenizer", ""))  # conditioned on text, not labels
    shape = dataset.sample_shape  # (C, H, W) or (C, T)
    if config.vae:  # a latent denoiser sees the VAE's latents
        from difforge.training.vae import read_vae_config

        shape = read_vae_config(config.vae).latent_shape
    return ModelConfig(
        name=name,
        net=config.net,
        process=config.process,
        parameterization=config.parameterization,
        sigma_data=config.sigma_data,
        num_classes=dataset.num_classes if dataset.labels is not None and not captioned else 0,
        image_shape=shape,
        class_names=tuple(getattr(dataset, "class_names", None) or ()),
        sampling=config.sampling,
    )


def reproduce_command(name: str, step: int, max_steps: int) -> str:
    """The command that retrains this model; a run cut short (time budget) stops at its step."""
    until = f" --until-step {step}" if step < max_steps else ""
    return f"difforge train --config train_config.json --out runs/{name}{until}"


def _kind(model_config: ModelConfig, config: TrainConfig) -> tuple[str, str]:
    """What the card calls the model, and the extra `difforge sample` flags of its example."""
    classes = model_config.num_classes
    if config.net.kind == "text_conditioned":
        return f"text-conditional ({config.net.config['backbone_kind']} backbone)", ""
    if config.conditioning is None or not config.conditioning.keys:
        return (f"class-conditional ({classes} classes)" if classes else "unconditional"), ""
    keys = config.conditioning.keys
    kind = "conditional (" + ", ".join(f"{k.name}: {k.kind} key" for k in keys) + ")"
    return kind, (" --cond 'slots=\"_6/3_\"'" if any(k.kind == "slots" for k in keys) else "")


def model_card(
    model_config: ModelConfig, config: TrainConfig, provenance: Mapping[str, Any]
) -> str:
    """README.md of a model folder: what it is, where it came from, how to rebuild it."""
    p = provenance
    s = model_config.sampling
    rows = [
        ("dataset", f"`{json.dumps(config.dataset)}` ({p['dataset_size']} images)"),
        ("dataset content hash", f"`{p['dataset_hash']}`"),
        ("network", f"{config.net.kind}, {p['parameters']:,} parameters"),
        (
            "parameterization",
            f"{config.parameterization} on process `{json.dumps(config.process)}`",
        ),
        ("training steps", f"{p['step']} ({p['images_seen']:,} images, batch {config.batch_size})"),
        ("final loss", f"{p['final_loss']:.4f}" if p.get("final_loss") is not None else "n/a"),
        ("non-finite steps skipped", str(p["nonfinite_total"])),
        ("weights", "EMA of the training weights"),
        ("code version", f"`{p['code_version']}`"),
        ("created", p["created"]),
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    kind, example = _kind(model_config, config)
    article = "An" if kind[0] in "aeiou" else "A"
    return f"""# {model_config.name}

{article} {kind} diffusion model trained with difforge. Every image it produces is synthetic.

| field | value |
|---|---|
{table}

## Sampling defaults

`{s.sampler}`, {s.steps} steps, `{s.grid}` sigma grid, guidance {s.guidance}.

```
difforge sample --model PATH --sampler {s.sampler} --steps {s.steps} --guidance {s.guidance}{example} --seed 42 --n 16 --out grid.png
```

## Reproduce

Save the training config below as `train_config.json`, then run

```
{reproduce_command(model_config.name, p["step"], config.max_steps)}
```

With the same code version and dataset content hash, training on the CPU is deterministic.

```json
{config.to_json()}
```
"""


def export_model(
    folder: Path,
    model_config: ModelConfig,
    config: TrainConfig,
    ema_weights: Mapping[str, Tensor],
    provenance: Mapping[str, Any],
    spec: ConditioningSpec | None = None,
) -> Path:
    """Write the final model folder (EMA weights, config, card, manifest).

    With a text `spec`, a v2 pipeline (its conditioning holds the tokenizer); else a v1 folder.
    """
    provenance = {**provenance, "code_version": code_version(), "created": _now()}
    model_config = model_config.model_copy(update={"provenance": dict(provenance)})
    card = model_card(model_config, config, provenance)
    if spec is None:
        return save_model(folder, model_config, ema_weights, card)
    pipeline = training_pipeline(model_config, spec).model_dump(exclude={"components"})
    pipeline["provenance"] = dict(provenance)
    return save_pipeline(folder, pipeline, {"denoiser": (model_config, ema_weights)}, card)


def export_pipeline(
    folder: Path,
    model_config: ModelConfig,
    config: TrainConfig,
    ema_weights: Mapping[str, Tensor],
    provenance: Mapping[str, Any],
    spec: ConditioningSpec,
    vae: Any | None = None,
    layout: tuple[Any, Mapping[str, Tensor]] | None = None,
) -> Path:
    """Write a v2 pipeline folder: denoiser/ (EMA weights) and, for a latent model, vae/.

    Args:
        spec: the conditioning the denoiser was trained with (pipeline.json holds it).
        vae: a `difforge.training.vae.LatentSource`, or None for a pixel-space pipeline.
        layout: (LayoutConfig, weights) of the planner of a planned slots key, saved as layout/.
    """
    provenance = {**provenance, "code_version": code_version(), "created": _now()}
    model_config = model_config.model_copy(update={"provenance": dict(provenance)})
    image_shape = tuple(vae.config.image_shape) if vae else tuple(model_config.image_shape)
    fields = {
        "name": model_config.name,
        "conditioning": spec,
        "sampling": config.sampling,
        "image_shape": image_shape,
        "provenance": dict(provenance),
    }
    components: dict[str, tuple[Any, Mapping[str, Tensor]]] = {
        "denoiser": (model_config, ema_weights)
    }
    base = None
    if vae is not None:
        components["vae"] = (vae.config, vae.weights)
        base = {"denoiser": {"vae": vae.sha256}}  # refused at save if the VAE saved differs
    if layout is not None:
        components["layout"] = layout
    card = model_card(model_config, config, provenance)
    if vae is not None:
        card += _vae_section(vae)
    if layout is not None:
        card += _layout_section(layout[0], config.layout)
    return save_pipeline(folder, fields, components, card, base=base)


def _vae_section(vae: Any) -> str:
    """The card's account of the VAE: what it is and the recipe that trained it."""
    p = vae.config.provenance
    recipe = dict(p.get("config") or {})
    if recipe:
        recipe["max_steps"] = p.get("steps", recipe.get("max_steps"))  # the steps it really ran
    init = recipe.get("init")
    chain = (
        f" It was initialised from the VAE with weights sha256 `{p.get('init_sha256')}` "
        f"(`{init}`), itself trained the same way; see that folder's card."
        if init
        else ""
    )
    return f"""
## Components

A latent pipeline: `vae/` ({tuple(vae.config.image_shape)} <-> {tuple(vae.config.latent_shape)},
scaling factor {vae.config.scaling_factor:.5f}, sha256 `{vae.sha256}`) and `denoiser/`, trained on
the VAE's scaled latents of the dataset (the denoiser records the VAE's hash and refuses another).

The VAE: {p.get("steps")} steps ({p.get("images_seen")} images, {p.get("train_seconds")} s), final
reconstruction loss {p.get("final_recon")}.{chain} Save its recipe below as `vae_config.json` and run
`difforge train-vae --config vae_config.json --out VAE_FOLDER`, then set `vae` in the training
config above to VAE_FOLDER.

```json
{json.dumps(recipe, indent=2, sort_keys=True)}
```
"""


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def sample_grid(model: Model, path: Path, seeds_per_class: int = 2) -> Path:
    """A labelled grid (images) or line plot (series) from the model's sampling defaults, fixed
    seeds, one column per class."""
    n = max(model.num_classes, 1) * seeds_per_class if model.num_classes else 16
    samples = model.sample(n=n, seed=0)
    if len(model.image_shape) == 2:
        return plot_series(samples.images, samples.labels, path, title=model.name)
    return save_samples_png(model, samples, path)


def plot_series(series: Tensor, labels: tuple[int, ...] | None, out: Path, title: str = "") -> Path:
    """Series (n, C, T) as a line plot PNG, one colour per label (channel 0 only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for i, s in enumerate(series[:, 0].float().numpy()):
        lab = None if labels is None else labels[i]
        ax.plot(s, lw=1.0, color=None if lab is None else f"C{lab % 10}", alpha=0.8)
    ax.set_xlabel("t")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metric lines logged after `step` (they belong to steps a resume will redo)."""
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss_curve(metrics_path: Path, out: Path) -> Path | None:
    """loss vs step (log scale) from metrics.jsonl, as a PNG; None when nothing was logged."""
    rows = [r for r in read_metrics(metrics_path) if r.get("loss") is not None]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], lw=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean over log interval)")
    if min(r["loss"] for r in rows) > 0:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.set_title(metrics_path.parent.name)
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out


def _layout_section(layout: Any, path: str | None) -> str:
    """The card's account of the layout planner (its own card has the full report)."""
    p = layout.provenance
    test = p.get("report", {}).get("test_captions", {})
    recipe = json.dumps(p.get("train_config", {}), indent=2, sort_keys=True)
    return f"""
## Layout stage

`layout/`: a text-to-layout planner (difforge.nets.layout; copied from `{path}`), {p.get("parameters")}
parameters, {p.get("steps")} steps on {p.get("captions")} captions; its drawn layouts satisfy
{test.get("fraction", float("nan")):.1%} of held-out test captions (n={test.get("n")}). At sampling
it draws each image's slots from the prompt and the image's seed; the denoiser reads them through
its slot path and the prompt through cross-attention. Retrain it with
`difforge train-layout --config layout_config.json --out LAYOUT_FOLDER` from this recipe:

```json
{recipe}
```
"""
