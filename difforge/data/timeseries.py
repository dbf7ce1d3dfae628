"""Time-series datasets of shape (N, C, T): UCR archive sets shipped in the `sktime` wheel, and a
synthetic set with known structure.

Real data. `sktime` 1.2.0 ships these UCR/UEA sets as `.ts` files inside its wheel
(`sktime/datasets/data/<Name>/<Name>_{TRAIN,TEST}.ts`, checked by listing the wheel): ArrowHead,
BasicMotions, GunPoint, ItalyPowerDemand, JapaneseVowels, OSULeaf, PLAID, Tecator, UnitTest, ...
(ECG200 is not among them). They are read straight from the installed package files (no
run-time download and no import of sktime itself), and only equal-length sets without missing
values are accepted. The archive's TRAIN and TEST files are kept apart: `split` picks one.

Normalisation rule (`normalize`):
  "series" (default): each series, each channel, is z-normalised over time,
      x <- (x - mean_t x) / std_t x (std floored at 1e-8), the UCR archive's own convention, so it
      needs no statistics from other series and train and test never leak into each other;
  "none": the values as stored in the file.
Resampling (`length`): when given, every series is linearly interpolated onto `length` evenly
spaced points spanning the same time range (before normalisation), e.g. GunPoint's 150 points to
128 so a 3-level U-Net can halve it twice.

Labels are the file's class labels, sorted (numerically when they all parse as numbers) and
mapped to 0..K-1; `class_names` keeps the original strings. The content hash covers the final
float32 values and labels, so the same set under another rule hashes differently.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.dataset import DatasetError, _check_labels
from difforge.data.hashing import content_hash
from difforge.data.mnist import DatasetUnavailableError

Normalize = Literal["series", "none"]
NORMALIZE_RULES: tuple[str, ...] = ("series", "none")
SPLITS: tuple[str, ...] = ("train", "test")
UCR_PACKAGE = "sktime"


@dataclass(frozen=True)
class SeriesDataset:
    """Series in memory: float32 (N, C, T), labels int64 (N,) or None, and a content hash.

    `normalize` and `length` record how the values were derived from the source (see the module
    docstring); content_hash covers the values and labels only.
    """

    name: str
    series: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    content_hash: str = field(default="")
    class_names: tuple[str, ...] = ()
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.series.dtype != torch.float32 or self.series.ndim != 3:
            raise InvalidArgumentError(
                f"{self.name}: series must be float32 (N, C, T), got {self.series.dtype} "
                f"{tuple(self.series.shape)}"
            )
        _check_labels(self.labels, self.series.shape[0], self.num_classes, self.name)
        if not self.content_hash:
            object.__setattr__(self, "content_hash", content_hash(self.series, self.labels))

    def __len__(self) -> int:
        return self.series.shape[0]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """One example's shape, (C, T)."""
        return tuple(self.series.shape[1:])

    def as_float(self) -> torch.Tensor:
        """The series, float32 (N, C, T)."""
        return self.series

    def fields(self) -> dict[str, torch.Tensor]:
        """Per-series data beside the values, {name: (N, ...)}; a conditioning spec reads them."""
        return {} if self.labels is None else {"labels": self.labels}

    def subset(self, index: torch.Tensor | np.ndarray, name: str | None = None) -> SeriesDataset:
        """The examples at `index` (positions or a boolean mask), classes and rule unchanged."""
        idx = torch.as_tensor(np.asarray(index))
        return SeriesDataset(
            name or self.name,
            self.series[idx].contiguous(),
            None if self.labels is None else self.labels[idx].contiguous(),
            self.num_classes,
            class_names=self.class_names,
            normalize=self.normalize,
        )


def normalize_series(x: np.ndarray, rule: str) -> np.ndarray:
    """Apply a normalisation rule to float (N, C, T) values (see the module docstring)."""
    check_choice("normalize", rule, NORMALIZE_RULES)
    if rule == "none":
        return x
    mean = x.mean(axis=-1, keepdims=True)
    std = np.maximum(x.std(axis=-1, keepdims=True), 1e-8)
    return (x - mean) / std


def resample(x: np.ndarray, length: int) -> np.ndarray:
    """Linear interpolation of (N, C, T) onto `length` evenly spaced points over the same span."""
    t_old = np.linspace(0.0, 1.0, x.shape[-1])
    t_new = np.linspace(0.0, 1.0, length)
    flat = x.reshape(-1, x.shape[-1])
    return np.stack([np.interp(t_new, t_old, row) for row in flat]).reshape(*x.shape[:-1], length)


def ucr_data_dir() -> Path:
    """Where the installed `sktime` package keeps its .ts files (found without importing it)."""
    spec = importlib.util.find_spec(UCR_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetUnavailableError(
            f"the UCR sets come from the {UCR_PACKAGE!r} wheel, which is not installed; "
            "pip install 'difforge[signals]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


def ucr_names() -> tuple[str, ...]:
    """Names of the sets the installed package ships as <Name>_TRAIN.ts / <Name>_TEST.ts."""
    root = ucr_data_dir()
    return tuple(sorted(d.name for d in root.iterdir() if (d / f"{d.name}_TRAIN.ts").is_file()))


def read_ts(path: Path) -> tuple[np.ndarray, list[str]]:
    """Parse an equal-length, no-missing-values .ts file: float64 (N, C, T) and the label strings.

    Each data line holds one case: channels separated by ':', values by ',', the label last.
    """
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    header, cases, labels = {}, [], []
    in_data = False
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not in_data:
            key, _, value = line.partition(" ")
            header[key.lower()] = value.strip().lower()
            in_data = key.lower() == "@data"
            continue
        *channels, label = line.split(":")
        cases.append([[float(v) for v in ch.split(",")] for ch in channels])
        labels.append(label.strip())
    for key, bad in (("@missing", "true"), ("@timestamps", "true"), ("@equallength", "false")):
        if header.get(key) == bad:
            raise DatasetError(f"{path}: {key} {bad} is not supported (equal length, no gaps)")
    try:
        arr = np.asarray(cases, dtype=np.float64)  # (N, C, T)
    except ValueError:
        raise DatasetError(f"{path}: cases differ in length or channel count") from None
    if arr.ndim != 3 or not len(arr) or not np.isfinite(arr).all():
        raise DatasetError(f"{path}: no cases, or non-finite values")
    return arr, labels


def _label_order(names: set[str]) -> list[str]:
    try:
        return sorted(names, key=float)
    except ValueError:
        return sorted(names)


def load_ucr(
    name: str,
    split: str = "train",
    length: int | None = None,
    normalize: str = "series",
) -> SeriesDataset:
    """A UCR/UEA set shipped in the `sktime` wheel, as float32 (N, C, T) with class labels.

    Args:
        name: a set in `ucr_names()`, e.g. "GunPoint", "ItalyPowerDemand", "ArrowHead".
        split: "train" or "test" (the archive's own files; never mixed).
        length: resample every series to this many points; None keeps the native length.
        normalize: "series" (per-series z-normalisation) or "none".

    Returns:
        SeriesDataset named "ucr-<name>-<split>". Classes are numbered from the labels of both
        files, so a class has the same index in train and test.
    """
    check_choice("split", split, SPLITS)
    check_choice("normalize", normalize, NORMALIZE_RULES)
    root = ucr_data_dir()
    check_choice("UCR set", name, ucr_names())
    if length is not None and (
        isinstance(length, bool) or not isinstance(length, int) or length < 2
    ):
        raise InvalidArgumentError(f"length must be an integer >= 2, got {length!r}")
    x, labels = read_ts(root / name / f"{name}_{split.upper()}.ts")
    other = "test" if split == "train" else "train"
    _, other_labels = read_ts(root / name / f"{name}_{other.upper()}.ts")
    classes = _label_order(set(labels) | set(other_labels))
    if length is not None and length != x.shape[-1]:
        x = resample(x, length)
    x = normalize_series(x, normalize).astype(np.float32)
    y = np.asarray([classes.index(lab) for lab in labels], dtype=np.int64)
    return SeriesDataset(
        f"ucr-{name}-{split}",
        torch.from_numpy(np.ascontiguousarray(x)),
        torch.from_numpy(y),
        len(classes),
        class_names=tuple(classes),
        normalize=normalize,
    )


def load_sines(
    n: int = 512, length: int = 64, num_classes: int = 3, seed: int = 0, noise: float = 0.05
) -> SeriesDataset:
    """Synthetic class-dependent sinusoids: x_t = sin(2 pi (k + 1) t / T + phi) + noise.

    Class k has k + 1 periods over the series; the phase phi ~ U[0, 2 pi) and the additive
    Gaussian noise (std `noise`) come from numpy's PCG64(seed), so (n, length, num_classes, seed,
    noise) fixes the set. Values are not normalised (std ~0.71), float32 (n, 1, length).
    """
    for what, value, lo in (("n", n, 1), ("length", length, 2), ("num_classes", num_classes, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < lo:
            raise InvalidArgumentError(f"{what} must be an integer >= {lo}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InvalidArgumentError(f"seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng(seed)
    k = rng.integers(0, num_classes, size=n)
    phase = rng.uniform(0.0, 2 * math.pi, size=n)
    t = np.arange(length) / length
    x = np.sin(2 * math.pi * (k[:, None] + 1) * t[None] + phase[:, None])
    x = x + noise * rng.standard_normal(x.shape)
    return SeriesDataset(
        f"sines-{num_classes}",
        torch.from_numpy(x[:, None, :].astype(np.float32)),
        torch.from_numpy(k.astype(np.int64)),
        num_classes,
        class_names=tuple(f"{c + 1} periods" for c in range(num_classes)),
    )


def read_series_csv(path: str | Path) -> np.ndarray:
    """Series from a CSV file, one per row, comma-separated values: float64 (N, T).

    A first row that is not all numbers is taken as a header and skipped; every row must have
    the same number of finite values.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    rows = [line for line in path.read_text().splitlines() if line.strip()]
    if rows and not _numeric(rows[0]):
        rows = rows[1:]
    try:
        x = np.asarray([[float(v) for v in r.split(",")] for r in rows], dtype=np.float64)
    except ValueError as e:
        raise DatasetError(f"{path}: not a CSV of numbers, one series per row ({e})") from None
    if x.ndim != 2 or not len(x) or not np.isfinite(x).all():
        raise DatasetError(f"{path}: rows must be non-empty, equally long and finite")
    return x


def _numeric(row: str) -> bool:
    try:
        [float(v) for v in row.split(",")]
    except ValueError:
        return False
    return True


def series_from_array(
    x: np.ndarray, name: str, length: int | None = None, normalize: str = "series"
) -> SeriesDataset:
    """An unlabelled SeriesDataset from raw float (N, T) or (N, C, T) values, resampled to
    `length` (when given) and normalised by the same rule as `load_ucr`."""
    x = np.asarray(x, dtype=np.float64)
    x = x[:, None, :] if x.ndim == 2 else x
    if x.ndim != 3:
        raise InvalidArgumentError(f"series must be (N, T) or (N, C, T), got {x.shape}")
    if length is not None and length != x.shape[-1]:
        x = resample(x, length)
    x = normalize_series(x, normalize).astype(np.float32)
    return SeriesDataset(name, torch.from_numpy(x), None, 0, normalize=normalize)
