"""The encode step: uint8 images -> PNG bytes carrying their provenance, and the JSON response.

Every PNG has tEXt chunks naming the model, its weights' sha256, the sampler settings, the image's
seed and conditioning, the request id, the creation time and `synthetic: true`; the JSON response carries
the same fields per image. `output_sha256` hashes the raw pixels (not the PNG, whose text changes
with the request id and time), so a replay of a logged request can be checked against it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

from PIL import Image, PngImagePlugin
from torch import Tensor


def pixels_sha256(images: Sequence[Tensor]) -> str:
    """sha256 over the images' uint8 bytes, (C, H, W) row-major, in order."""
    h = hashlib.sha256()
    for img in images:
        h.update(img.contiguous().numpy().tobytes())
    return h.hexdigest()


def png_bytes(image: Tensor, text: Mapping[str, str]) -> bytes:
    """A uint8 (C, H, W) image, C in {1, 3}, as PNG with `text` as tEXt chunks."""
    arr = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    pil = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    info = PngImagePlugin.PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    buf = io.BytesIO()
    pil.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (for clients and tests)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return dict(img.text)


def png_pixels(data: bytes):
    """A PNG's pixels as a uint8 numpy array (H, W) or (H, W, C)."""
    import numpy as np

    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()


def provenance(
    common: Mapping[str, Any], seed: int, conditioning: Mapping[str, Any], index: int
) -> dict[str, Any]:
    """One image's provenance: the request's common fields plus its own seed, its conditioning
    ({key: JSON value}, e.g. {"labels": 3}) and its index."""
    return {**common, "seed": seed, "conditioning": dict(conditioning), "index": index}


def as_text_chunks(prov: Mapping[str, Any]) -> dict[str, str]:
    """Provenance as PNG text: strings as they are, everything else as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in prov.items()}


def encode_images(
    images: Sequence[Tensor],
    common: Mapping[str, Any],
    seeds: Sequence[int],
    conditioning: Mapping[str, Sequence[Any]],
) -> list[tuple[dict[str, Any], bytes]]:
    """(provenance, PNG bytes) per image; `conditioning` is {key: one JSON value per image}."""
    out = []
    for i, img in enumerate(images):
        prov = provenance(common, seeds[i], {k: v[i] for k, v in conditioning.items()}, i)
        out.append((prov, png_bytes(img, as_text_chunks(prov))))
    return out


def json_body(
    request_id: str, common: Mapping[str, Any], encoded, output_sha256: str, extra: Mapping
) -> bytes:
    """The JSON response for one or several images."""
    images = [
        {**prov, "png_base64": base64.b64encode(data).decode("ascii")} for prov, data in encoded
    ]
    body = {"request_id": request_id, **common, "output_sha256": output_sha256, **extra}
    body["images"] = images
    return json.dumps(body).encode()
