"""Drawing the images of one repeat: per-image noise seeds, class labels, batches, and the
sampler settings resolved over a model's defaults (and described for the report).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from torch import Tensor

from difforge.common.distributed import current
from difforge.core.errors import check_choice
from difforge.evaluation.config import LABEL_POLICIES, SEED_STRIDE, check_n, check_seed
from difforge.pipeline import Model
from difforge.samplers import get_sigmas, sampler_knobs


def image_seeds(seed: int, n: int) -> list[int]:
    """Noise seeds of the n images of the repeat with seed `seed`: seed * SEED_STRIDE + i."""
    check_seed(seed)
    check_n(n)
    return [seed * SEED_STRIDE + i for i in range(n)]


def make_labels(policy: str, n: int, num_classes: int, seed: int) -> list[int] | None:
    """Class labels of n images: None for an unconditional model (num_classes = 0).

    balanced: image i gets class i % num_classes (every prefix is as balanced as it can be);
    random: uniform over the classes, drawn with numpy's default_rng(seed).
    """
    check_choice("label policy", policy, LABEL_POLICIES)
    if num_classes == 0:
        return None
    if policy == "balanced":
        return [i % num_classes for i in range(n)]
    return np.random.default_rng(seed).integers(0, num_classes, n).tolist()


def in_batches(
    draw: Callable[[list[int] | None, list[int]], tuple[Tensor, int]],
    labels: Sequence[int] | None,
    seeds: Sequence[int],
    batch_size: int,
) -> tuple[Tensor, int]:
    """Call `draw(labels, seeds) -> (uint8 images, nfe)` on batches; (all images, NFE per image).

    Under torchrun the batches are dealt over the ranks (batch i on rank i % N) and gathered, each
    at the shape one process would use, so every rank gets the single-process images byte for byte.
    """
    world = current()
    nfe = [0]

    def call(start: int, stop: int) -> Tensor:
        part = None if labels is None else list(labels[start:stop])
        images, nfe[0] = draw(part, list(seeds[start:stop]))
        return images

    images = world.run_chunks(len(seeds), batch_size, call)
    return images, world.broadcast_ints(nfe)[0]


def resolve_sampling(
    model: Model,
    sampler: str | None,
    steps: int | None,
    guidance: float | None,
    grid: str | None,
    knobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sampler settings `Model.sample` will use, resolved by the library's one resolver (the
    same defaults and errors as the CLI and HTTP: e.g. guidance on an unconditional model is an
    error, not silently 1)."""
    from difforge.pipeline import resolve

    given = {"sampler": sampler, "steps": steps, "guidance": guidance, "grid": grid}
    request = {k: v for k, v in given.items() if v is not None} | {"seed": 0}
    plan = resolve(model, request | {"options": dict(knobs or {})})
    return {
        "sampler": plan.sampler,
        "steps": plan.steps,
        "guidance": plan.guidance,
        "grid": plan.grid,
        "knobs": dict(plan.options),
    }


def draw_with(model: Model, sampling: Mapping[str, Any]) -> Callable:
    """A `draw(labels, seeds)` for `in_batches` that calls `model.sample` with `sampling`."""
    s = dict(sampling)
    knobs = s.pop("knobs", {})

    def draw(labels: list[int] | None, seeds: list[int]) -> tuple[Tensor, int]:
        out = model.sample(labels=labels, n=len(seeds), seeds=seeds, **s, **knobs)
        return out.images, out.nfe

    return draw


def describe_sampling(model: Model, sampling: Mapping[str, Any], nfe: int | None) -> dict:
    """Every sampler setting: name, steps, grid and its sigmas, guidance, all knobs, NFE."""
    sigmas = get_sigmas(sampling["grid"], sampling["steps"], process=model.process)
    return {
        "name": sampling["sampler"],
        "steps": sampling["steps"],
        "nfe": nfe,
        "grid": sampling["grid"],
        "guidance": sampling["guidance"],
        "knobs": sampler_knobs(sampling["sampler"]) | dict(sampling["knobs"]),
        "sigmas": [float(s) for s in sigmas],
        "process": dict(model.config.process),
    }
