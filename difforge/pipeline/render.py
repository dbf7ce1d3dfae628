"""Pixels to files: a labelled grid of samples as one PNG, its provenance in PNG text chunks."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import Tensor

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline.model import Model, Samples


def grid_metadata(model: Model, samples: Samples) -> dict[str, str]:
    """PNG text chunks recording where a grid of `samples` came from."""
    meta = {
        "model": model.name,
        "model_sha256": model.sha256,
        "sampler": samples.sampler,
        "steps": str(samples.steps),
        "guidance": repr(samples.guidance),
        "grid": samples.grid,
        "seeds": json.dumps(list(samples.seeds)),
        "labels": json.dumps(None if samples.labels is None else list(samples.labels)),
        "nfe": str(samples.nfe),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "synthetic": "true",
        "software": "difforge",
    }
    if samples.conditioning is not None:
        meta["conditioning"] = json.dumps(samples.conditioning)
    return meta


def save_grid_png(
    path: str | Path,
    images: Tensor,
    *,
    captions: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    nrow: int | None = None,
    min_tile: int = 56,
) -> Path:
    """Tile uint8 images (n, C, H, W) into one PNG, a caption above each, metadata as text chunks.

    Args:
        path: output file.
        images: uint8 (n, 1 or 3, H, W).
        captions: one short string per image (e.g. its label), or None.
        metadata: PNG tEXt chunks (provenance).
        nrow: images per row; default ceil(sqrt(n)).
        min_tile: small images are upscaled (nearest) to at least this many pixels.
    """
    from PIL import Image, ImageDraw, PngImagePlugin

    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise InvalidArgumentError("images must be uint8 (n, 1 or 3, H, W)")
    n, _, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    scale = max(1, math.ceil(min_tile / min(h, w)))
    th, tw, cap, pad = h * scale, w * scale, (12 if captions else 0), 2
    rows = math.ceil(n / nrow)
    canvas = Image.new("RGB", (nrow * (tw + pad) + pad, rows * (th + cap + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    arr = images.permute(0, 2, 3, 1).expand(-1, -1, -1, 3).contiguous().numpy()  # (n, H, W, 3)
    for i in range(n):
        x, y = pad + (i % nrow) * (tw + pad), pad + (i // nrow) * (th + cap + pad)
        tile = Image.fromarray(arr[i], "RGB").resize((tw, th), Image.NEAREST)
        canvas.paste(tile, (x, y + cap))
        if captions:
            draw.text((x + 1, y), str(captions[i]), fill="black")
    info = PngImagePlugin.PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path, pnginfo=info)
    return path


def save_samples_png(model: Model, samples: Samples, path: str | Path) -> Path:
    """A captioned grid of `samples` with the model's provenance in its text chunks."""
    n = len(samples.seeds)
    nrow = min(n, max(model.num_classes, 1)) if samples.labels else None
    return save_grid_png(
        path,
        samples.images,
        captions=samples.captions,
        metadata=grid_metadata(model, samples),
        nrow=nrow,
    )
