"""A folder of PNG/JPEG images, decoded with Pillow into an in-memory `ImageDataset`.

Layouts (like torchvision's ImageFolder):
  root/cat/001.png, root/dog/x.jpg   -> labelled; classes are the sorted sub-folder names
  root/001.png, root/002.jpg         -> unlabelled
Files are read in sorted relative-path order, so the same files give the same content hash on
any machine. Hidden files and folders (".name") and files of other extensions are skipped.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.dataset import DatasetError, ImageDataset

ColorMode = Literal["grayscale", "rgb"]
COLOR_MODES: tuple[str, ...] = ("grayscale", "rgb")
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg")
_PIL_MODE = {"grayscale": "L", "rgb": "RGB"}


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")
    )


def _visible_dirs(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_images(class_dir: Path) -> list[Path]:
    """Images anywhere under one class folder, sorted, skipping hidden sub-folders."""
    found = [
        p
        for p in class_dir.rglob("*")
        if _is_image(p) and not any(part.startswith(".") for part in p.relative_to(class_dir).parts)
    ]
    return sorted(found, key=lambda p: p.relative_to(class_dir).as_posix())


def scan_image_folder(root: Path) -> tuple[list[Path], list[int] | None, tuple[str, ...]]:
    """(files, labels or None, class names) for the layout described in the module docstring."""
    if not root.is_dir():
        raise DatasetError(f"image folder {root} does not exist or is not a directory")
    top = sorted((p for p in root.iterdir() if _is_image(p)), key=lambda p: p.name)
    class_dirs = [d for d in _visible_dirs(root) if _class_images(d)]
    if top and class_dirs:
        raise DatasetError(
            f"{root} mixes images at the top level ({top[0].name}, ...) with class sub-folders "
            f"({class_dirs[0].name}, ...); put every image in a class folder, or none"
        )
    if top:
        return top, None, ()
    if not class_dirs:
        raise DatasetError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {root} or its sub-folders"
        )
    files: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        images = _class_images(class_dir)
        files.extend(images)
        labels.extend([label] * len(images))
    return files, labels, tuple(d.name for d in class_dirs)


def decode_image(path: Path, size: tuple[int, int], mode: str) -> np.ndarray:
    """One file -> uint8 (C, H, W): EXIF-rotated, alpha over white, center-cropped, resized.

    Raises:
        DatasetError: naming `path` when Pillow cannot read it.
    """
    height, width = size
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
            img = img.convert(_PIL_MODE[mode])
            # Crop the largest centered box of the target aspect, then resize (antialiased).
            img = ImageOps.fit(img, (width, height), method=Image.Resampling.BICUBIC)
            arr = np.asarray(img, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _check_size(size: int | tuple[int, int]) -> tuple[int, int]:
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(
        isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pair
    ):
        raise InvalidArgumentError(f"size must be a positive int or (height, width), got {size!r}")
    return pair  # type: ignore[return-value]


def load_image_folder(
    path: str | Path, size: int | tuple[int, int], mode: ColorMode = "rgb"
) -> ImageDataset:
    """Decode every PNG/JPEG under `path` into uint8 (N, C, H, W), labelled by sub-folder.

    Args:
        path: the folder (layouts in the module docstring).
        size: output side (square) or (height, width); images are center-cropped to that
            aspect ratio, then resized with bicubic filtering.
        mode: "grayscale" (C = 1) or "rgb" (C = 3); transparency is composited over white.

    Returns:
        ImageDataset with labels int64 and class_names when the images sit in sub-folders,
        labels None otherwise; content_hash covers the decoded pixels and labels.

    Raises:
        UnknownChoiceError: `mode` is not one of COLOR_MODES.
        DatasetError: the folder is missing or has no images, or an image cannot be decoded.
    """
    check_choice("color mode", mode, COLOR_MODES)
    hw = _check_size(size)
    root = Path(path)
    files, labels, class_names = scan_image_folder(root)
    images = np.stack([decode_image(f, hw, mode) for f in files])  # (N, C, H, W) uint8
    return ImageDataset(
        name=f"folder-{root.resolve().name}",
        images=torch.from_numpy(images),
        labels=None if labels is None else torch.tensor(labels, dtype=torch.int64),
        num_classes=len(class_names),
        class_names=class_names,
    )
