"""Cascaded diffusion (Ho et al. 2022, "Cascaded Diffusion Models"): a base model, then an
upsampler conditioned on the base's output, as one model.

    CASCADE/
      pipeline.json   CascadeConfig: format difforge-cascade/1, each stage's folder and sha256,
                      the upsampler's sampling settings and conditioning augmentation level
      base/           a model folder (v1 or v2), e.g. 14x14 class-conditional
      upsampler/      a v2 folder with one low_res key whose shape is the base's image shape
      README.md
      manifest.json   sha256 of every file, the stages' own files included

Loading is strict per stage (each stage folder is loaded with `load`, its own manifest checked)
and the sha256 recorded for each stage must be that stage's identity (`Model.sha256`), so a stage
swapped for another model is refused, naming both hashes.

Sampling: a request resolves against the base (its conditioning, seeds, sampler, steps); image i
is the base's image i, quantised to uint8, upscaled with the seed `stream_seeds([seed_i],
UPSAMPLER_STREAM)`. So `cascade.sample(seed=s)` equals `upscale(upsampler, base.sample(seed=s)
.images, seeds=stream_seeds(...))` byte for byte, and image i depends on its seed only.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.core.sigmas import GridKind
from difforge.pipeline.artifact import (
    CARD_FILE,
    PIPELINE_FILE,
    ModelIntegrityError,
    _temp,
    _write_manifest,
    _write_text,
    read_config,
    sha256_file,
)
from difforge.pipeline.conditioning import Row
from difforge.pipeline.model import Model, Samples, network_cost
from difforge.pipeline.request import Plan, resolve

CASCADE_FORMAT = "difforge-cascade/1"
UPSAMPLER_STREAM = 3  # the upsampler's seeds: stream 3 of the request's (1: inpainting, 2: aug)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class StageRef(_Frozen):
    """One stage: its sub-folder and its identity (the stage's `Model.sha256`)."""

    path: str
    sha256: str


class UpsamplerStage(StageRef):
    """The upsampler stage with the settings a cascade samples it with (None: its defaults)."""

    sampler: str | None = None
    steps: int | None = Field(None, ge=1)
    grid: GridKind | None = None
    level: float | None = Field(None, ge=0)  # conditioning augmentation std at sampling


class CascadeConfig(_Frozen):
    """pipeline.json of a cascade."""

    format: Literal["difforge-cascade/1"] = CASCADE_FORMAT
    name: str
    base: StageRef
    upsampler: UpsamplerStage
    provenance: dict[str, Any] = Field(default_factory=dict)


def low_res_key(model: Model):
    """The model's one low_res key (an upsampler), or InvalidArgumentError."""
    keys = [k for k in model.spec.keys if k.kind == "low_res"]
    if len(keys) != 1:
        raise InvalidArgumentError(
            f"model {model.name!r} is not an upsampler (it has no low_res conditioning key; "
            f"keys: {list(model.spec.names) or 'none'})"
        )
    return keys[0]


def with_level(model: Model, level: float | None) -> Model:
    """`model` (an upsampler) sampling with conditioning augmentation `level` (None: as is).

    A shallow copy: the network and weights are shared, only the conditioning spec differs."""
    if level is None:
        return model
    key = low_res_key(model)
    if not (isinstance(level, int | float) and 0 <= level < float("inf")):
        raise InvalidArgumentError(f"level must be a finite number >= 0, got {level!r}")
    new_key = key.model_copy(update={"level": float(level)})
    spec = model.spec.model_copy(
        update={"keys": tuple(new_key if k is key else k for k in model.spec.keys)}
    )
    out = copy_model(model)
    out.spec = spec
    return out


def copy_model(model: Model) -> Model:
    out = object.__new__(type(model))
    out.__dict__.update(model.__dict__)
    return out


def check_stages(base: Model, upsampler: Model) -> None:
    """The upsampler must take the base's images as its low_res input."""
    key = low_res_key(upsampler)
    if tuple(key.shape) != tuple(base.image_shape):
        raise ModelIntegrityError(
            f"the upsampler {upsampler.name!r} takes low_res images {tuple(key.shape)} but the "
            f"base {base.name!r} makes {tuple(base.image_shape)}"
        )


class Cascade(Model):
    """A base model and an upsampler, sampled as one model (a `Model` to every caller).

    Requests resolve against the base (its conditioning, sampler, steps, guidance); what comes
    back has the upsampler's image shape. `nfe` counts both stages' network evaluations.
    """

    def __init__(
        self,
        config: CascadeConfig,
        base: Model,
        upsampler: Model,
        sha256: str,
        path: Path | None = None,
    ):
        check_stages(base, upsampler)
        self.cascade, self.base = config, base
        self.upsampler = with_level(upsampler, config.upsampler.level)
        self.name, self.sha256, self.path = config.name, sha256, path
        self.config, self.pipeline = base.config, None
        self.spec, self.sampling = base.spec, base.sampling
        self.image_shape = self.latent_shape = tuple(upsampler.image_shape)
        self.process, self.net, self.denoiser = base.process, base.net, base.denoiser
        self.vae = self.vae_config = None
        self.adapters = {}

    def __repr__(self) -> str:
        return (
            f"Cascade(name={self.name!r}, sha256={self.sha256[:12]}..., "
            f"{self.base.image_shape} -> {self.image_shape}, cond={self.spec.names})"
        )

    def with_backend(self, backend: Any = "eager", **options: Any) -> Model:
        """Only the batch-invariant kernels, for both stages: ("eager", kernels="invariant")."""
        if backend != "eager" or options != {"kernels": "invariant"}:
            raise InvalidArgumentError(
                'a cascade runs its stages eagerly (or with kernels="invariant"); set other '
                "backends per stage"
            )
        new = copy.copy(self)
        new.base = self.base.with_backend(backend, **options)
        new.upsampler = self.upsampler.with_backend(backend, **options)
        new.denoiser, new.backend = new.base.denoiser, new.base.backend
        return new

    def upsampler_seeds(self, seeds: Sequence[int]) -> list[int]:
        from difforge.samplers.noise import stream_seeds

        return stream_seeds(seeds, UPSAMPLER_STREAM)

    def sample_latents(
        self,
        rows: Sequence[Row],
        plan: Plan,
        *,
        seeds: Sequence[int] | None = None,
        guidance=None,
        uncond: Sequence[Row] | None = None,
        callback: Callable | None = None,
        edit=None,
        chunk_rows: int | None = None,
    ) -> tuple[Tensor, int]:
        """Base, then upsampler: (float32 (B, *image_shape) in [-1, 1], NFE of both stages);
        `chunk_rows` runs both stages' networks at that fixed shape (Model.sample_latents)."""
        if (edit or plan.edit) is not None:
            raise InvalidArgumentError("a cascade does not edit images; edit with a stage")
        seeds = plan.seeds if seeds is None else seeds
        x, nfe = self.base.sample_latents(
            rows,
            plan,
            seeds=seeds,
            guidance=guidance,
            uncond=uncond,
            callback=callback,
            chunk_rows=chunk_rows,
        )
        low = self.base.decode(x)  # uint8 (B, *base.image_shape): what an image of it would be
        up = self.upsampler_plan(low, self.upsampler_seeds(seeds))
        y, nfe_up = self.upsampler.sample_latents(up.rows, up, chunk_rows=chunk_rows)
        return y, nfe + nfe_up

    def upsampler_plan(self, low: Tensor, seeds: Sequence[int]) -> Plan:
        s = self.cascade.upsampler
        request = {"low_res": list(low), "seeds": list(seeds)}
        request |= {k: v for k, v in (("sampler", s.sampler), ("steps", s.steps)) if v}
        request |= {"grid": s.grid} if s.grid else {}
        return resolve(self.upsampler, request)

    def decode(self, latents: Tensor) -> Tensor:
        return self.upsampler.decode(latents)

    def encode(self, images: Tensor) -> Tensor:
        raise InvalidArgumentError("a cascade has no encoder")

    def upscale(self, images: Any, **kwargs: Any) -> Samples:
        """Upscale with the upsampler stage (see `difforge.pipeline.upscale.upscale`)."""
        return self.upsampler.upscale(images, **kwargs)

    def components(self) -> dict[str, dict[str, Any]]:
        out = {}
        for name, stage in (("base", self.base), ("upsampler", self.upsampler)):
            params, flops = network_cost(stage.net, stage.latent_shape, stage.spec)
            out[name] = {
                "sha256": stage.sha256,
                "parameters": params,
                "flops_per_forward": flops,
                "net": stage.config.net.kind,
            }
        return out

    def summary(self) -> dict[str, Any]:
        parts = self.components()
        s = self.upsampler.sampling
        up = self.cascade.upsampler
        return {
            **self.base.summary(),
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "format": CASCADE_FORMAT,
            "sha256": self.sha256,
            "image_shape": list(self.image_shape),
            "latent_shape": list(self.image_shape),
            "parameters": sum(p["parameters"] for p in parts.values()),
            "flops_per_forward": sum(p["flops_per_forward"] for p in parts.values()),
            "components": parts,
            "upsampler_sampling": {
                "sampler": up.sampler or s.sampler,
                "steps": up.steps or s.steps,
                "grid": up.grid or s.grid,
                "level": low_res_key(self.upsampler).level,
            },
            "provenance": self.cascade.provenance,
        }


def is_cascade(folder: Path) -> bool:
    """Whether the model folder's pipeline.json is a cascade's."""
    path = folder / PIPELINE_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == CASCADE_FORMAT
    except (json.JSONDecodeError, AttributeError):
        return False


def load_cascade(folder: Path) -> Cascade:
    """A cascade folder whose manifest has been verified -> a Cascade, each stage strict."""
    from difforge.pipeline.loading import load

    config = read_config(folder / PIPELINE_FILE, CascadeConfig)
    stages = {}
    for name in ("base", "upsampler"):
        ref = getattr(config, name)
        stage = load(_stage_path(folder, ref.path))
        if stage.sha256 != ref.sha256:
            raise ModelIntegrityError(
                f"{folder}: stage {name!r} ({ref.path}/) is model {stage.sha256[:12]}... but "
                f"{PIPELINE_FILE} records {ref.sha256[:12]}..."
            )
        if isinstance(stage, Cascade):
            raise ModelIntegrityError(f"{folder}: stage {name!r} is itself a cascade")
        stages[name] = stage
    return Cascade(
        config, stages["base"], stages["upsampler"], sha256_file(folder / PIPELINE_FILE), folder
    )


def _stage_path(folder: Path, name: str) -> Path:
    if "/" in name or name in ("", ".", "..") or name.startswith("."):
        raise ModelIntegrityError(f"{folder}/{PIPELINE_FILE}: bad stage folder {name!r}")
    return folder / name


def save_cascade(
    folder: str | Path,
    base: str | Path,
    upsampler: str | Path,
    *,
    name: str | None = None,
    upsampler_settings: Mapping[str, Any] | None = None,
    card: str = "",
    provenance: Mapping[str, Any] | None = None,
) -> Path:
    """Write a cascade folder atomically from two model folders (copied in); returns its path.

    Args:
        folder: destination; an existing model there is replaced.
        base, upsampler: model folders; both are loaded (strictly) and checked to fit.
        name: the cascade's name [the folder's name].
        upsampler_settings: sampler, steps, grid, level of the upsampler stage [its defaults].
        card: README.md text.
        provenance: JSON recorded in pipeline.json (e.g. how the stages were trained).
    """
    from difforge.common.atomic import atomic_folder
    from difforge.pipeline.loading import load

    folder = Path(folder)
    models = {"base": load(base), "upsampler": load(upsampler)}
    check_stages(models["base"], models["upsampler"])
    fields = {
        "name": name or folder.name,
        "base": {"path": "base", "sha256": models["base"].sha256},
        "upsampler": {
            "path": "upsampler",
            "sha256": models["upsampler"].sha256,
            **dict(upsampler_settings or {}),
        },
        "provenance": dict(provenance or {}),
    }
    config = CascadeConfig.model_validate(fields)
    with atomic_folder(folder, tmp=_temp(folder)) as tmp:
        for stage in ("base", "upsampler"):
            shutil.copytree(models[stage].path, tmp / stage)
        _write_text(
            tmp / PIPELINE_FILE, json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
        )
        _write_text(tmp / CARD_FILE, card)
        _write_manifest(tmp, CASCADE_FORMAT)
    loaded = load(folder)  # what was written loads, strictly
    if not isinstance(loaded, Cascade):
        raise ModelIntegrityError(f"{folder}: the written cascade does not load as one")
    return folder
