"""The Model facade: a loaded pipeline (denoiser, optional VAE) with one conditioning spec.

`Model.sample` is the short form (keyword arguments -> the request resolver -> `generate`);
`Model.generate(plan)` runs a resolved plan; `Model.decode` is the one place that turns the
sampler's output into uint8 pixels (identity for pixel models, VAE decode for latent ones).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from difforge.core.chunked import chunked
from difforge.core.denoiser import EDMPrecond, ModelDenoiser
from difforge.core.errors import InvalidArgumentError
from difforge.core.processes import NoiseProcess, make_process
from difforge.core.sigmas import get_sigmas
from difforge.pipeline.conditioning import ConditioningSpec, Row
from difforge.pipeline.config import (
    LayoutConfig,
    ModelConfig,
    NetSpec,
    PipelineConfig,
    SamplingDefaults,
    VAEConfig,
)
from difforge.pipeline.editing import Edit, sample_arguments
from difforge.pipeline.layout import plan_layouts
from difforge.pipeline.request import Plan, RequestLimits, resolve


def build_network(spec: NetSpec) -> nn.Module:
    """The network `spec` names, randomly initialised (from the global torch RNG)."""
    from difforge.nets import build_net

    return build_net(spec.kind, spec.config)


def build_denoiser(config: ModelConfig, net: nn.Module) -> nn.Module:
    """Wrap `net` in the adapter its parameterization needs (one place knows the prediction)."""
    if config.parameterization == "edm":
        return EDMPrecond(net, config.sigma_data)
    return ModelDenoiser(
        net, make_process(config.process), config.parameterization, time_scale=config.time_scale
    )


def network_cost(
    net: nn.Module, shape: Sequence[int], spec: ConditioningSpec | int = 0
) -> tuple[int, int]:
    """(parameter count, FLOPs of one forward pass on one input of `shape`) of a difforge net."""
    from difforge.nets import count_parameters, flops_per_forward

    if isinstance(spec, int):  # a v1 class count
        spec = ConditioningSpec.for_classes(spec)
    x = torch.zeros(1, *shape)  # (1, *shape)
    return count_parameters(net), flops_per_forward(net, x, torch.zeros(1), spec.null_batch(1))


def to_uint8(x: Tensor) -> Tensor:
    """Data-space images in [-1, 1] -> uint8 in [0, 255], same shape."""
    return ((x.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


@dataclass(frozen=True)
class Samples:
    """Images drawn by `Model.sample`, with what is needed to draw them again."""

    images: Tensor  # uint8 (n, C, H, W); float32 (n, C, T) in data units for a series model
    labels: tuple[int | None, ...] | None  # the class key's values, when the model has one
    seeds: tuple[int, ...]
    nfe: int
    sampler: str
    steps: int
    guidance: float
    grid: str
    conditioning: dict[str, list[Any]] | None = None  # every key's JSON values, one per image
    captions: tuple[str, ...] | None = None  # one short text per image (grids)
    edit: dict[str, Any] | None = None  # an edit's parameters (Edit.params(): input hashes)


class Model:
    """A loaded model: its components, conditioning spec, sampling defaults and identity.

    Use `difforge.load(path)` to get one. `config` is the denoiser component's config.
    """

    def __init__(
        self,
        config: ModelConfig,
        net: nn.Module,
        sha256: str,
        path: Path | None = None,
        *,
        pipeline: PipelineConfig | None = None,
        vae: nn.Module | None = None,
        vae_config: VAEConfig | None = None,
        layout: nn.Module | None = None,
        layout_config: LayoutConfig | None = None,
    ):
        self.config = config
        self.pipeline = pipeline
        self.name = pipeline.name if pipeline else config.name
        self.sha256 = sha256
        self.path = path
        self.spec: ConditioningSpec = pipeline.conditioning if pipeline else config.conditioning()
        self.sampling: SamplingDefaults = pipeline.sampling if pipeline else config.sampling
        self.latent_shape = tuple(config.image_shape)  # what the denoiser sees
        self.image_shape = tuple(pipeline.image_shape) if pipeline else self.latent_shape
        self.process: NoiseProcess = make_process(config.process)
        net.eval().requires_grad_(False)
        self.net = net
        self.denoiser = build_denoiser(config, net).eval()
        self.vae, self.vae_config = vae, vae_config
        self.layout, self.layout_config = layout, layout_config  # planned slots (pipeline.layout)
        self.adapters: dict[str, Any] = {}  # name -> AttachedAdapter (pipeline.adapters)
        # a guidance-distilled student takes w as an input: one forward per step, no uncond half
        self.guidance_input = bool(config.net.config.get("guidance_embed", False))

    backend: Any = None  # the Backend that `with_backend` set; None: eager, the default

    def with_backend(self, backend: Any = "eager", **options: Any) -> Model:
        """This model with its network run by another backend: "eager", "compile" or
        "onnxruntime" (see difforge.pipeline.backends.Backend for the options)."""
        from difforge.pipeline.backends import with_backend

        return with_backend(self, backend, **options)

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, sha256={self.sha256[:12]}..., cond={self.spec.names})"

    @property
    def num_classes(self) -> int:
        """Classes of the class key (0 when there is none)."""
        key = self.spec.class_key()
        return key.num_classes if key else 0

    @property
    def class_names(self) -> tuple[str, ...]:
        key = self.spec.class_key()
        return key.class_names if key else ()

    def sample(
        self,
        labels: int | Sequence[int | None] | None = None,
        n: int | None = None,
        *,
        cond: Mapping[str, Any] | None = None,
        sampler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
        seed: int | None = None,
        seeds: Sequence[int] | None = None,
        grid: str | None = None,
        callback: Callable | None = None,
        limits: RequestLimits | None = None,
        init_image: Any = None,
        mask: Any = None,
        strength: float | None = None,
        chunk_rows: int | None = None,
        **knobs,
    ) -> Samples:
        """Draw n images; image i depends only on (seeds[i], its conditioning) and the settings.

        The short form of `generate(resolve(model, request))`; see difforge.pipeline.request for
        the defaults (n, seeds, conditioning, guidance) shared with the CLI and HTTP.

        Args:
            labels: the class key's value(s): one class for all images or one per image.
            n: number of images.
            cond: values of other conditioning keys, {key: value}.
            sampler, steps, guidance, grid: default to the model's sampling settings.
            seed: image i uses seed + i, unless `seeds` gives one seed per image; none: random.
            callback: called after each sampler step with a StepInfo.
            init_image, mask, strength: img2img / inpainting (difforge.pipeline.editing), e.g.
                a uint8 (C, H, W) tensor, a mask (H, W) with 1 = generate, strength in (0, 1].
            chunk_rows: run the network on exactly this many rows per call (guidance's two
                halves count as rows; difforge.core.chunked): the bytes a server with
                batch_invariance "chunk" and the same chunk_rows returns. None: one call per step.
            **knobs: sampler-specific options (e.g. eta for ddim, max_order for ipndm).

        Returns:
            Samples with uint8 images (n, C, H, W), the conditioning, seeds and NFE used.
        """
        values = dict(cond or {})
        if labels is not None:
            key = self.spec.class_key()
            if key is None:
                raise InvalidArgumentError(f"model {self.name!r} has no class key: no labels")
            values[key.name] = list(labels) if isinstance(labels, Sequence) else labels
        request = {"n": n, "seed": seed, "seeds": None if seeds is None else list(seeds)}
        request |= {"sampler": sampler, "steps": steps, "guidance": guidance, "grid": grid}
        request |= {"init_image": init_image, "mask": mask, "strength": strength}
        request = {k: v for k, v in request.items() if v is not None}
        reserved = set(request) & set(values)
        if reserved:
            raise InvalidArgumentError(f"conditioning keys clash with arguments: {reserved}")
        plan = resolve(self, {**request, **values, "options": knobs}, limits)
        return self.generate(plan, callback=callback, chunk_rows=chunk_rows)

    def upscale(self, images: Any, **kwargs: Any) -> Samples:
        """Super-resolve `images` with this upsampler (difforge.pipeline.upscale.upscale)."""
        from difforge.pipeline.upscale import upscale

        return upscale(self, images, **kwargs)

    def generate(
        self, plan: Plan, *, callback: Callable | None = None, chunk_rows: int | None = None
    ) -> Samples:
        """Run a resolved plan in one batched sampler call and decode the result to pixels."""
        x, nfe = self.sample_latents(
            plan.rows, plan, uncond=plan.uncond_rows, callback=callback, chunk_rows=chunk_rows
        )
        return self.samples_of(plan, self.decode(x), nfe)

    def samples_of(self, plan: Plan, images: Tensor, nfe: int) -> Samples:
        """The Samples record of `plan` drawn as uint8 `images` (n, *image_shape) in nfe NFE."""
        key = self.spec.class_key()
        labels = None if key is None else tuple(plan.conditioning[key.name])
        return Samples(
            images=images,
            labels=labels,
            seeds=plan.seeds,
            nfe=nfe,
            sampler=plan.sampler,
            steps=plan.steps,
            guidance=plan.guidance,
            grid=plan.grid,
            conditioning=plan.conditioning,
            captions=tuple(self.spec.caption(r) for r in plan.rows) if self.spec.keys else None,
            edit=None if plan.edit is None else plan.edit.params(),
        )

    def sample_latents(
        self,
        rows: Sequence[Row],
        plan: Plan,
        *,
        seeds: Sequence[int] | None = None,
        guidance: Tensor | float | None = None,
        uncond: Sequence[Row] | None = None,
        callback: Callable | None = None,
        edit: Edit | None = None,
        chunk_rows: int | None = None,
    ) -> tuple[Tensor, int]:
        """One sampler call over `rows`: (float32 denoiser-space output (B, *latent_shape), NFE).

        `seeds`, `guidance` and `edit` default to the plan's (serving passes its own per-row
        values); `uncond` gives guidance's unconditional row per image (negative prompts; None:
        null); an edit runs img2img / inpainting (difforge.pipeline.editing); `chunk_rows` runs
        the network on that many rows per call (difforge.core.chunked; None: the whole batch).
        """
        from difforge.samplers import sample

        w = plan.guidance if guidance is None else guidance
        guided = plan.guided if guidance is None else True
        seeds = plan.seeds if seeds is None else seeds
        edit = plan.edit if edit is None else edit
        editing = {} if edit is None else sample_arguments(self, edit, seeds)
        cond = self.spec.augment(self.spec.collate(rows), seeds)
        cond = plan_layouts(self.layout, self.layout_config, self.spec, cond, seeds)
        # a guidance-input student is the guided denoiser itself (Meng et al. 2023); getattr:
        # test fakes borrow this method
        if getattr(self, "guidance_input", False) and guided:
            w_rows = torch.as_tensor(w, dtype=torch.float32).expand(len(rows)).clone()
            cond, guided = {**cond, "guidance": w_rows}, False
        denoiser = self.denoiser if plan.adapter is None else self.denoiser_for(plan.adapter)
        res = sample(
            chunked(denoiser, chunk_rows),
            get_sigmas(plan.grid, plan.steps, process=self.process),
            shape=self.latent_shape,
            seeds=seeds,
            sampler=plan.sampler,
            cond=cond,
            uncond=(self.spec.collate(uncond) if uncond else self.spec.null_batch(len(rows)))
            if guided
            else None,
            guidance=w if guided else 1.0,
            callback=callback,
            **editing,
            **dict(plan.options),
        )
        return res.x, res.nfe

    def denoiser_for(self, adapter: str | None) -> nn.Module:
        """The base denoiser (None) or that of an attached adapter."""
        if adapter is None:
            return self.denoiser
        if adapter not in self.adapters:
            names = ", ".join(self.adapters) or "(none)"
            raise InvalidArgumentError(f"model {self.name!r} has no adapter {adapter!r}: {names}")
        return self.adapters[adapter].denoiser

    def decode(self, latents: Tensor) -> Tensor:
        """Sampler output (B, *latent_shape) -> uint8 images (B, *image_shape); a series model's
        (B, C, T) output is returned as float32 data values (series are not quantised).

        The VAE decodes one image per call: a conv kernel's reduction order can depend on the
        batch size (measured: 1.7e-5 apart on the toy VAE), and an image's bytes must not depend
        on what else was decoded with it. One decode is cheap beside the sampling loop.
        """
        if self.vae is None:
            return to_uint8(latents) if len(self.latent_shape) == 3 else latents.float()
        scale = self.vae_config.scaling_factor
        with torch.no_grad():
            images = [self.vae.decode(z[None] / scale).float() for z in latents]  # (1, C, H, W)
        return to_uint8(torch.cat(images))

    def encode(self, images: Tensor) -> Tensor:
        """Data-space images (B, *image_shape) in [-1, 1] -> scaled latents (the VAE mean)."""
        if self.vae is None:
            return images.float()
        with torch.no_grad():
            return self.vae.encode(images.float())[0] * self.vae_config.scaling_factor

    def components(self) -> dict[str, dict[str, Any]]:
        """Each component's sha256 and parameter count (what `difforge info` lists)."""
        from difforge.nets import count_parameters

        refs = self.pipeline.components if self.pipeline else {}
        out = {
            "denoiser": {
                "sha256": refs["denoiser"].sha256 if refs else self.sha256,
                "parameters": count_parameters(self.net),
                "net": self.config.net.kind,
            }
        }
        if self.vae is not None:
            out["vae"] = {
                "sha256": refs["vae"].sha256,
                "parameters": count_parameters(self.vae),
                "net": self.vae_config.net.kind,
                "scaling_factor": self.vae_config.scaling_factor,
            }
        if self.layout is not None:
            out["layout"] = {
                "sha256": refs["layout"].sha256 if "layout" in refs else "(training)",
                "parameters": count_parameters(self.layout),
                "net": self.layout_config.net.kind,
            }
        for name, ref in refs.items():
            out[name]["base"] = dict(ref.base)
        return out

    def summary(self) -> dict[str, Any]:
        """What `difforge info` prints: identity, shapes, components, cost, defaults, provenance."""
        params, flops = network_cost(self.net, self.latent_shape, self.spec)
        c = self.config
        return {
            "name": self.name,
            "path": str(self.path) if self.path else None,
            "format": self.pipeline.format if self.pipeline else c.format,
            "sha256": self.sha256,
            "num_classes": self.num_classes,
            "class_names": list(self.class_names),
            "conditioning": self.spec.model_dump()["keys"],
            "image_shape": list(self.image_shape),
            "latent_shape": list(self.latent_shape),
            "net": c.net.kind,
            "parameters": params,
            "flops_per_forward": flops,
            "components": self.components(),
            "parameterization": c.parameterization,
            "process": c.process,
            "sampling": self.sampling.model_dump(),
            "provenance": self.pipeline.provenance if self.pipeline else c.provenance,
        }
