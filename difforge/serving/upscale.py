"""POST /v1/upscale: super-resolution over HTTP, as a generate request on an upsampler.

The body is the generate body with `image` (a base64 PNG, or a list of one per image) in place
of the upsampler's low_res conditioning field; everything else (seed/seeds, n, sampler, steps,
response_format, deadline_ms) means what it means for /v1/generate, with the same limits: the
encoded image's size (`limits.max_image_bytes`, 413) and its pixel size (422) are checked before
anything is decoded, and the request then batches, caches and is audited like any other.
The conditioning augmentation level is the served model's recorded one.
"""

from __future__ import annotations

import json
from typing import Any

from difforge.serving.protocol import RequestInvalid, field_error

UPSCALE_ONLY = ("image",)  # fields of an upscale body that generate does not have
NOT_HERE = ("level", "init_image", "mask", "strength", "resample", "guidance")


def upsampler_key(model: Any):
    """The served model's low_res key, or None (the model is no upsampler)."""
    return next((k for k in model.spec.keys if k.kind == "low_res"), None)


def generate_body(body: bytes, model: Any) -> bytes:
    """An upscale body -> the equivalent /v1/generate body for `model`, or RequestInvalid.

    Only the top-level keys are looked at here; values are checked by the resolver."""
    key = upsampler_key(model)
    if key is None:
        msg = f"the served model {model.name!r} is not an upsampler (no low_res key); serve one"
        raise RequestInvalid([field_error((), msg, "not_upsampler")])
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return body  # the generate parser reports where the JSON is bad
    if not isinstance(data, dict):
        return body
    problems = [
        field_error(name, "is not a field of /v1/upscale", "extra")
        for name in (*NOT_HERE, key.name)
        if name in data
    ]
    if "image" not in data:
        problems.append(field_error("image", "is required: a base64 PNG (or a list)", "missing"))
    if problems:
        raise RequestInvalid(problems)
    data[key.name] = data.pop("image")
    return json.dumps(data).encode()


def image_schema(key: Any, max_n: int) -> dict[str, Any]:
    """JSON Schema of a low_res value: a base64 PNG, or a list of one per image."""
    png = {
        "type": "string",
        "contentEncoding": "base64",
        "contentMediaType": "image/png",
        "description": f"a {key.size}x{key.size} PNG ({key.channels} channel(s)), base64; "
        "a data:image/png;base64, prefix is allowed",
    }
    per_image = {"type": "array", "items": png, "minItems": 1, "maxItems": max_n}
    return {"anyOf": [png, per_image], "description": "one image for all, or one per image"}


def upscale_request_schema(config: Any, model: Any, generate: dict[str, Any]) -> dict[str, Any]:
    """The POST /v1/upscale body: the generate body's sampling fields plus `image`."""
    key = upsampler_key(model)
    props = {
        k: v
        for k, v in generate["properties"].items()
        if k not in NOT_HERE and k not in {k.name for k in model.spec.keys}
    }
    props["image"] = (
        image_schema(key, config.limits.max_n)
        if key is not None
        else {"type": "string", "contentEncoding": "base64", "contentMediaType": "image/png"}
    )
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["image"],
        "properties": props,
        "description": (
            "The low-resolution image(s) to upscale, with the sampling fields of /v1/generate "
            f"(their rules and limits). An encoded image over {config.limits.max_image_bytes} "
            "bytes is a 413, a wrong size or format a 422, before any compute; a served model "
            "that is no upsampler answers 422. The conditioning augmentation level is the "
            "model's recorded one."
        ),
    }
