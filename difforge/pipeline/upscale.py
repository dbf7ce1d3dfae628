"""Super-resolution of given images by an upsampler model (one with a `low_res` key).

`upscale(model, images, seeds=...)` is the short form of resolving {"low_res": images, ...} and
generating: the same resolver, limits and errors as `sample`, so the CLI (`difforge upscale`),
HTTP (`POST /v1/upscale`) and the library agree. Image i depends only on its input, its seed and
the settings (the conditioning augmentation draws from the seed's own stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from difforge.pipeline.cascade import Cascade, low_res_key, with_level
from difforge.pipeline.conditioning import FieldProblem
from difforge.pipeline.model import Model, Samples
from difforge.pipeline.request import Plan, RequestInvalid, RequestLimits, resolve


def upscale_request(model: Model, images: Any, **fields: Any) -> dict[str, Any]:
    """The request dict of an upscale: {low_res key: images, **fields without None values}."""
    key = low_res_key(model)
    return {key.name: images, **{k: v for k, v in fields.items() if v is not None}}


def upscaler(model: Model, level: float | None = None) -> Model:
    """The model that upscales for `model`: itself, or a cascade's upsampler stage; at `level`."""
    if isinstance(model, Cascade):
        model = model.upsampler
    low_res_key(model)  # an upsampler, or a clear error
    return with_level(model, level)


def resolve_upscale(
    model: Model, request: dict[str, Any], limits: RequestLimits | None = None
) -> tuple[Model, Plan]:
    """(the upsampler at the request's `level`, the resolved plan) for an upscale request dict
    ({"image": ..., "seed": ..., "level": ..., ...}; other fields as `sample`'s)."""
    request = dict(request)
    m = upscaler(model, request.pop("level", None))
    images = request.pop("image", None)
    if images is None:
        raise RequestInvalid([FieldProblem(("image",), "is required: the image(s) to upscale")])
    return m, resolve(m, upscale_request(m, images, **request), limits)


def upscale(
    model: Model,
    images: Any,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    sampler: str | None = None,
    steps: int | None = None,
    grid: str | None = None,
    level: float | None = None,
    limits: RequestLimits | None = None,
    callback: Callable | None = None,
    **knobs: Any,
) -> Samples:
    """Upscale `images` with an upsampler (or a cascade's upsampler stage).

    Args:
        model: a model with a low_res conditioning key, or a Cascade.
        images: uint8 (n, C, h, w) or (C, h, w) tensor, PNG bytes or base64 PNG text, or a list
            of one per image; (C, h, w) must be the key's shape (e.g. (1, 14, 14)).
        seed, seeds: image i uses seed + i, or seeds[i] (none: random, reported back).
        sampler, steps, grid: default to the upsampler's sampling settings.
        level: the conditioning augmentation std [the model's recorded level].
        limits: request limits (a service's), checked before anything is decoded.
        **knobs: sampler options.

    Returns:
        Samples with uint8 images (n, *model.image_shape); conditioning records each input's
        sha256 and level.
    """
    request = {"image": images, "seed": seed, "seeds": None if seeds is None else list(seeds)}
    request |= {"sampler": sampler, "steps": steps, "grid": grid, "level": level}
    request = {k: v for k, v in request.items() if v is not None} | {"options": knobs}
    m, plan = resolve_upscale(model, request, limits)
    return m.generate(plan, callback=callback)
