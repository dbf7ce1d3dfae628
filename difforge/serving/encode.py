"""The encode step: uint8 images -> PNG bytes carrying their provenance, and the JSON response.

Every PNG has tEXt chunks naming the model, its weights' sha256, the sampler settings, the image's
seed and conditioning, the request id, the creation time and `synthetic: true`; the JSON response carries
the same fields per image. `output_sha256` hashes the raw pixels (not the PNG, whose text changes
with the request id and time), so a replay of a logged request can be checked against it. PNG
writing and reading live in `difforge.common.png`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from difforge.common.png import png_bytes


def pixels_sha256(images: Sequence[Tensor]) -> str:
    """sha256 over the images' uint8 bytes, (C, H, W) row-major, in order."""
    h = hashlib.sha256()
    for img in images:
        h.update(img.contiguous().numpy().tobytes())
    return h.hexdigest()


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
    edits: Sequence[Mapping[str, Any]] | None = None,
    filters: Sequence[Mapping[str, Any]] | None = None,
) -> list[tuple[dict[str, Any], bytes]]:
    """(provenance, PNG bytes) per image; `conditioning` is {key: one JSON value per image};
    `edits` one edit record per image (its init image's and mask's sha256, strength);
    `filters` one output filter record per image (decision, each filter's name and version)."""
    out = []
    for i, img in enumerate(images):
        prov = provenance(common, seeds[i], {k: v[i] for k, v in conditioning.items()}, i)
        if edits is not None:
            prov["edit"] = dict(edits[i])
        if filters is not None:
            prov["filters"] = dict(filters[i])
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


def series_json_body(
    request_id: str,
    common: Mapping[str, Any],
    series: Sequence[Tensor],
    seeds: Sequence[int],
    conditioning: Mapping[str, Sequence[Any]],
    output_sha256: str,
    extra: Mapping,
) -> bytes:
    """The JSON response of a series model: per series its provenance and `values` (C, T)."""
    items = [
        {
            **provenance(common, seeds[i], {k: v[i] for k, v in conditioning.items()}, i),
            "values": x.float().tolist(),
        }
        for i, x in enumerate(series)
    ]
    body = {"request_id": request_id, **common, "output_sha256": output_sha256, **extra}
    body["series"] = items
    return json.dumps(body).encode()


def series_csv_body(
    series: Sequence[Tensor], seeds: Sequence[int], conditioning: Mapping[str, Sequence[Any]]
) -> bytes:
    """CSV: a header `index,seed,<conditioning keys>,channel,t0..t{T-1}`, one row per series
    and channel; values as float32 printed exactly (repr)."""
    keys = list(conditioning)
    length = series[0].shape[-1] if series else 0
    lines = [",".join(["index", "seed", *keys, "channel", *(f"t{t}" for t in range(length))])]
    for i, x in enumerate(series):
        cond = ["" if conditioning[k][i] is None else str(conditioning[k][i]) for k in keys]
        for c, row in enumerate(x.float().tolist()):
            lines.append(",".join([str(i), str(seeds[i]), *cond, str(c), *map(repr, row)]))
    return ("\n".join(lines) + "\n").encode()
