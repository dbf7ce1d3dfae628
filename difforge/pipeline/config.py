"""Typed, frozen configs of a model folder: the denoiser component (config.json), the VAE component,
and the pipeline (pipeline.json) that names the components, the conditioning and the sampling
defaults.

Format v1 (wave 1) is one denoiser: `ModelConfig` at the top of the folder. Format v2 is a
pipeline: `PipelineConfig` in pipeline.json and one sub-folder per component, each with its own
config.json and model.safetensors.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from difforge.core.errors import check_choice
from difforge.core.sigmas import GridKind
from difforge.pipeline.conditioning import ConditioningSpec

FORMAT_V1 = "difforge-model/1"
FORMAT_V2 = "difforge-pipeline/2"
VAE_FORMAT = "difforge-vae/1"
LAYOUT_FORMAT = "difforge-layout/1"
ComponentName = Literal["denoiser", "vae", "text_encoder", "adapters", "layout"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class NetSpec(_Frozen):
    """Which network to build: `difforge.nets.build_net(kind, config)`."""

    kind: str = "unet"
    config: dict[str, Any] = Field(default_factory=dict)  # the net's own config, as JSON

    @model_validator(mode="after")
    def _complete(self) -> NetSpec:
        # Validate against the net's own config class and store every field, defaults included,
        # so two specs that build the same net compare equal.
        from difforge.nets import net_config_from_dict

        full = net_config_from_dict(self.kind, self.config).to_dict()
        object.__setattr__(self, "config", full)
        return self


class SamplingDefaults(_Frozen):
    """How a model samples unless told otherwise."""

    sampler: str = "dpmpp_2m"  # a name in difforge.samplers.SAMPLERS
    steps: int = Field(20, ge=1)
    guidance: float = 3.0  # classifier-free guidance scale; 1 = plain conditional
    grid: GridKind = "karras"

    @field_validator("sampler")
    @classmethod
    def _known_sampler(cls, v: str) -> str:
        from difforge.samplers import SAMPLERS

        check_choice("sampler", v, SAMPLERS)
        return v


class ModelConfig(_Frozen):
    """The denoiser component: everything needed to rebuild its network and adapter.

    In a v1 folder this is the whole model; in v2 the pipeline's conditioning and sampling win,
    and `base` records the sha256 of each component it was trained with (e.g. the VAE).
    """

    format: Literal["difforge-model/1"] = FORMAT_V1
    name: str
    net: NetSpec
    process: dict[str, Any]  # `make_process` dict
    parameterization: Literal["eps", "x0", "v", "velocity", "edm"]
    sigma_data: float = Field(0.5, gt=0)  # EDM preconditioning only
    time_scale: float = Field(1.0, gt=0)  # ModelDenoiser's time input multiplier
    num_classes: int = Field(0, ge=0)  # v1: 0 unconditional; label num_classes = the null class
    # (C, H, W) of what the denoiser sees (latents in v2), or (C, T) for series (a unet1d net)
    image_shape: tuple[int, int, int] | tuple[int, int]
    class_names: tuple[str, ...] = ()  # the name of each label, when the dataset has them
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    provenance: dict[str, Any] = Field(default_factory=dict)  # informational, not used to rebuild

    def conditioning(self, dropout: float = 0.1) -> ConditioningSpec:
        """The v1 conditioning: a class key when num_classes > 0."""
        return ConditioningSpec.for_classes(self.num_classes, self.class_names, dropout)


class VAEConfig(_Frozen):
    """The VAE component: an autoencoder net and the scale of its latents."""

    format: Literal["difforge-vae/1"] = VAE_FORMAT
    net: NetSpec  # kind "autoencoder"
    scaling_factor: float = Field(1.0, gt=0)  # z_model = scaling_factor * z (1 / std over data)
    image_shape: tuple[int, int, int]  # (C, H, W) pixels
    latent_shape: tuple[int, int, int]  # (C, h, w) latents
    provenance: dict[str, Any] = Field(default_factory=dict)


class LayoutConfig(_Frozen):
    """The layout component: a planner net (kind "layout_planner", difforge.nets.layout) that reads
    the text key `prompt`'s token ids and draws the planned slots key `slots` per image."""

    format: Literal["difforge-layout/1"] = LAYOUT_FORMAT
    net: NetSpec  # kind "layout_planner"
    prompt: str = "prompt"  # the text key whose ids it reads
    slots: str = "slots"  # the slots key it fills
    tokenizer_sha256: str  # of the tokenizer JSON it was trained with (the text key's)
    provenance: dict[str, Any] = Field(default_factory=dict)


class ComponentRef(_Frozen):
    """One component of a pipeline: its folder and the sha256 of its weights file."""

    path: str  # sub-folder name
    sha256: str  # of its model.safetensors
    base: dict[str, str] = Field(default_factory=dict)  # component -> sha256 it was made for


class PipelineConfig(_Frozen):
    """pipeline.json: the components, the one conditioning spec, sampling defaults, provenance."""

    format: Literal["difforge-pipeline/2"] = FORMAT_V2
    name: str
    components: dict[ComponentName, ComponentRef]
    conditioning: ConditioningSpec = Field(default_factory=ConditioningSpec)
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)
    image_shape: tuple[int, int, int]  # (C, H, W) of what `sample` returns
    provenance: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _has_denoiser(self) -> PipelineConfig:
        if "denoiser" not in self.components:
            raise ValueError("a pipeline needs a 'denoiser' component")
        for name, ref in self.components.items():
            for other in ref.base:
                if other not in self.components:
                    raise ValueError(f"component {name!r} names a base {other!r} that is absent")
        return self
