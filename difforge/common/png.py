"""PNG files that carry their provenance: uint8 images (one, or a captioned grid) with tEXt
chunks (model, weights sha256, sampler settings, seeds, `synthetic: true`, ...), as bytes or
written atomically to a path; and the readers clients and tests use to get them back.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from torch import Tensor

from difforge.common.atomic import write_bytes_atomic
from difforge.core.errors import InvalidArgumentError


def _png(image: Image.Image, text: Mapping[Any, Any] | None) -> bytes:
    """A PIL image as PNG bytes with each `text` item as a tEXt chunk (keys and values str'd)."""
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_text(str(key), str(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def png_bytes(image: Tensor, text: Mapping[str, str] | None = None) -> bytes:
    """A uint8 (C, H, W) image, C in {1, 3}, as PNG (grey or RGB) with `text` as tEXt chunks."""
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InvalidArgumentError("image must be uint8 (1 or 3, H, W)")
    arr = image.permute(1, 2, 0).contiguous().numpy()  # (H, W, C)
    pil = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    return _png(pil, text)


def grid_image(
    images: Tensor,
    *,
    captions: Sequence[str] | None = None,
    nrow: int | None = None,
    min_tile: int = 56,
) -> Image.Image:
    """Tile uint8 images (n, 1 or 3, H, W) on a white RGB canvas, a caption above each.

    Args:
        images: uint8 (n, 1 or 3, H, W).
        captions: one short string per image (e.g. its label), or None.
        nrow: images per row; default ceil(sqrt(n)).
        min_tile: small images are upscaled (nearest) to at least this many pixels.
    """
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
    return canvas


def grid_png_bytes(
    images: Tensor,
    *,
    captions: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    nrow: int | None = None,
    min_tile: int = 56,
) -> bytes:
    """`grid_image` as PNG bytes with `metadata` as tEXt chunks (provenance)."""
    return _png(grid_image(images, captions=captions, nrow=nrow, min_tile=min_tile), metadata)


def save_grid_png(
    path: str | Path,
    images: Tensor,
    *,
    captions: Sequence[str] | None = None,
    metadata: Mapping[str, str] | None = None,
    nrow: int | None = None,
    min_tile: int = 56,
) -> Path:
    """Write `grid_png_bytes(...)` to `path` atomically (parent folders created); returns it.

    Args:
        path: output file (PNG whatever its suffix).
        images: uint8 (n, 1 or 3, H, W).
        captions, nrow, min_tile: as for `grid_image`.
        metadata: PNG tEXt chunks (provenance).
    """
    data = grid_png_bytes(
        images, captions=captions, metadata=metadata, nrow=nrow, min_tile=min_tile
    )
    return write_bytes_atomic(path, data)


def write_png(path: str | Path, image: Tensor, text: Mapping[str, str] | None = None) -> Path:
    """Write `png_bytes(image, text)` to `path` atomically; returns it."""
    return write_bytes_atomic(path, png_bytes(image, text))


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks of a PNG (for clients and tests)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return dict(img.text)


def png_pixels(data: bytes) -> np.ndarray:
    """A PNG's pixels as a uint8 numpy array (H, W) or (H, W, C)."""
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img).copy()
