"""PNG with provenance: single images and grids keep their pixels and text chunks, and the grid
writer gives the very bytes wave 1's `difforge.model.save_grid_png` gave."""

from __future__ import annotations

import hashlib

import pytest
import torch

from difforge.common.png import (
    grid_png_bytes,
    png_bytes,
    png_pixels,
    png_text,
    save_grid_png,
    write_png,
)
from difforge.core.errors import InvalidArgumentError


def _images(n: int, c: int, h: int = 7, w: int = 5) -> torch.Tensor:
    g = torch.Generator().manual_seed(n * 10 + c)
    return torch.randint(0, 256, (n, c, h, w), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("channels", [1, 3])
def test_one_image_round_trips_pixels_and_text(tmp_path, channels):
    img = _images(1, channels)[0]
    text = {"model": "m", "seed": "3", "synthetic": "true", "note": "ünïcode"}
    data = png_bytes(img, text)
    assert png_text(data) == text
    pixels = png_pixels(data)
    expected = img[0] if channels == 1 else img.permute(1, 2, 0)
    assert (torch.from_numpy(pixels) == expected).all()
    path = write_png(tmp_path / "sub" / "x.png", img, text)
    assert path.read_bytes() == data


def test_bad_images_are_refused():
    with pytest.raises(InvalidArgumentError, match="uint8"):
        png_bytes(torch.zeros(3, 4, 4))
    with pytest.raises(InvalidArgumentError, match="uint8"):
        grid_png_bytes(torch.zeros(2, 2, 4, 4, dtype=torch.uint8))


def test_grid_tiles_upscaled_images_with_captions_and_metadata():
    images = _images(5, 1, 8, 8)
    data = grid_png_bytes(images, captions=list("abcde"), metadata={"seeds": "[0]"}, nrow=3)
    assert png_text(data) == {"seeds": "[0]"}
    grid = png_pixels(data)  # 8 px tiles upscaled x7 to 56, 2 px padding, 12 px captions
    assert grid.shape == (2 * (56 + 12 + 2) + 2, 3 * (56 + 2) + 2, 3)
    tile = torch.from_numpy(grid[2 + 12 : 2 + 12 + 56 : 7, 2 : 2 + 56 : 7, 0])
    assert (tile == images[0, 0]).all()


@pytest.mark.parametrize(
    ("n", "channels", "captions", "nrow", "digest"),
    [
        (4, 1, None, None, "f49e3bf236c535e9"),
        (6, 3, ["0", "1", "2", "3", "4", "5"], 3, "6a8e27a2dca93782"),
        (1, 1, ["seven"], None, "57c8c830bfbbe33a"),
    ],
)
def test_grid_bytes_equal_those_of_the_wave_1_writer(tmp_path, n, channels, captions, nrow, digest):
    """Digests of the PNG bytes wave 1's `difforge.model.save_grid_png` wrote (commit dbb5040)."""
    images = _images(n, channels)
    meta = {"model": "tiny", "model_sha256": "ab" * 32, "seeds": "[1, 2]", "synthetic": "true"}
    ours = save_grid_png(tmp_path / "ours.png", images, captions=captions, metadata=meta, nrow=nrow)
    assert hashlib.sha256(ours.read_bytes()).hexdigest()[:16] == digest
    assert grid_png_bytes(images, captions=captions, metadata=meta, nrow=nrow) == ours.read_bytes()
