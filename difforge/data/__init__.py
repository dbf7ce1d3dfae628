"""difforge.data: datasets decoded into memory, each with a content hash of its examples and labels."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.captions import CaptionedDataset, load_mnist_captions
from difforge.data.dataset import DatasetError, ImageDataset, PointDataset
from difforge.data.folder import COLOR_MODES, load_image_folder
from difforge.data.hashing import content_hash
from difforge.data.mnist import DatasetUnavailableError, load_mnist
from difforge.data.resolution import (
    SuperResolutionDataset,
    downsample,
    load_downsampled,
    load_super_resolution,
)
from difforge.data.scene_captions import SceneCaptionDataset, load_scene_captions
from difforge.data.scenes import SceneDataset, load_scenes
from difforge.data.timeseries import SeriesDataset, load_sines, load_ucr, ucr_names
from difforge.data.toy import TOY_NAMES, GaussianMixture, eight_gaussians, load_toy

# kind -> loader; a spec's other keys are the loader's keyword arguments.
_LOADERS: dict[str, Callable[..., ImageDataset | PointDataset | SeriesDataset]] = {
    "mnist": load_mnist,
    "folder": load_image_folder,
    "toy": load_toy,
    "scenes": load_scenes,
    "ucr": load_ucr,
    "sines": load_sines,
    "mnist_captions": load_mnist_captions,
    "scene_captions": load_scene_captions,
    "downsampled": load_downsampled,
    "super_resolution": load_super_resolution,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)


def _parse_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """A spec as (kind, loader arguments); "kind:value" sets the loader's first argument."""
    if isinstance(spec, str):
        kind, sep, value = spec.partition(":")
        check_choice("dataset kind", kind, DATASETS)
        first = next(iter(inspect.signature(_LOADERS[kind]).parameters))
        return kind, ({first: value} if sep else {})
    if not isinstance(spec, Mapping) or "kind" not in spec:
        raise InvalidArgumentError(f"a dataset spec needs a 'kind' key, got {spec!r}")
    args = dict(spec)
    kind = args.pop("kind")
    check_choice("dataset kind", kind, DATASETS)
    return kind, args


def load_dataset(spec: str | Mapping[str, Any]) -> ImageDataset | PointDataset | SeriesDataset:
    """Load the dataset a spec names.

    Args:
        spec: a dict with "kind" (one of DATASETS) and that loader's arguments, e.g.
            {"kind": "mnist", "split": "train"},
            {"kind": "folder", "path": "imgs/", "size": 32, "mode": "rgb"},
            {"kind": "toy", "name": "moons", "n": 10000, "seed": 0},
            {"kind": "scenes", "split": "train", "n": 20000, "seed": 0},
            {"kind": "scene_captions", "split": "train", "max_tokens": 32},
            {"kind": "ucr", "name": "GunPoint", "split": "test", "length": 128},
            {"kind": "sines", "n": 512, "length": 64};
            or the shorthand "kind" / "kind:value" ("mnist:test", "toy:rings") setting the
            loader's first argument and leaving the rest at their defaults.

    Returns:
        ImageDataset (mnist, folder; SceneDataset for scenes), PointDataset (toy) or SeriesDataset (ucr, sines).

    Raises:
        UnknownChoiceError: unknown kind. InvalidArgumentError: unknown or missing arguments.
    """
    kind, args = _parse_spec(spec)
    params = inspect.signature(_LOADERS[kind]).parameters
    unknown = sorted(set(args) - set(params))
    if unknown:
        raise InvalidArgumentError(
            f"unknown {kind} dataset arguments {unknown}; allowed: {', '.join(params)}"
        )
    missing = [
        p for p, v in params.items() if v.default is inspect.Parameter.empty and p not in args
    ]
    if missing:
        raise InvalidArgumentError(f"{kind} dataset spec is missing {missing}")
    return _LOADERS[kind](**args)


__all__ = [
    "COLOR_MODES",
    "DATASETS",
    "TOY_NAMES",
    "CaptionedDataset",
    "DatasetError",
    "DatasetUnavailableError",
    "GaussianMixture",
    "ImageDataset",
    "PointDataset",
    "SceneCaptionDataset",
    "SceneDataset",
    "SeriesDataset",
    "SuperResolutionDataset",
    "content_hash",
    "downsample",
    "eight_gaussians",
    "load_dataset",
    "load_downsampled",
    "load_image_folder",
    "load_mnist",
    "load_mnist_captions",
    "load_scene_captions",
    "load_scenes",
    "load_sines",
    "load_super_resolution",
    "load_toy",
    "load_ucr",
    "ucr_names",
]
