"""Reference statistics: features, mean and covariance of a real dataset under one extractor.

They are cached on disk as safetensors (arrays) + JSON (provenance), never pickles, under a key
made of the dataset's content hash and the extractor's weights sha256, so a changed dataset or a
retrained extractor can never be paired with stale statistics: a different key is a different
file, and a file whose JSON or sha256 does not match its key is recomputed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load as load_npz_bytes
from safetensors.numpy import save as save_npz_bytes

from difforge.common.atomic import write_bytes_atomic
from difforge.core.errors import InvalidArgumentError
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation.features import FeatureExtractor, extract
from difforge.evaluation.metrics import feature_stats

CACHE_FORMAT = 1  # bump when what is stored, or how it is computed, changes


@dataclass(frozen=True, eq=False)
class ReferenceStats:
    """Features of a real dataset under one extractor, and their mean and covariance.

    features: float32 (N, D), in dataset order (for KID and precision/recall);
    mu: float64 (D,); sigma: float64 (D, D), the unbiased covariance (for FID).
    """

    name: str
    dataset_hash: str
    extractor_name: str
    extractor_sha256: str
    features: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray

    @property
    def num_samples(self) -> int:
        return int(self.features.shape[0])

    @property
    def feature_dim(self) -> int:
        return int(self.features.shape[1])

    def rms_pairwise_distance(self) -> float:
        """sqrt(E||x - x'||^2) over independent pairs = sqrt(2 Tr(sigma)): the feature scale."""
        return float(np.sqrt(2 * np.trace(self.sigma)))

    def describe(self) -> dict:
        """JSON-able provenance (no arrays), as recorded in reports and in the cache."""
        return {
            "name": self.name,
            "dataset_hash": self.dataset_hash,
            "extractor_name": self.extractor_name,
            "extractor_sha256": self.extractor_sha256,
            "num_samples": self.num_samples,
            "feature_dim": self.feature_dim,
        }


def default_cache_dir() -> Path:
    """~/.cache/difforge."""
    return Path.home() / ".cache" / "difforge"


def cache_key(dataset_hash: str, extractor_sha256: str) -> str:
    """16 hex digits of sha256 over the cache format, dataset content hash and extractor sha256."""
    text = f"difforge-reference-v{CACHE_FORMAT}|{dataset_hash}|{extractor_sha256}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def compute_reference_stats(
    dataset: ImageDataset, extractor: FeatureExtractor, *, batch_size: int = 500
) -> ReferenceStats:
    """Run `extractor` over all of `dataset` (uint8 images) and summarise; no caching."""
    if dataset.images.dtype != torch.uint8:
        raise InvalidArgumentError(f"reference images must be uint8, got {dataset.images.dtype}")
    feats = extract(extractor.features, dataset.images, batch_size=batch_size)  # (N, D) float64
    mu, sigma = feature_stats(feats)
    return ReferenceStats(
        name=dataset.name,
        dataset_hash=dataset.content_hash,
        extractor_name=extractor.name,
        extractor_sha256=extractor.sha256,
        features=feats.astype(np.float32),
        mu=mu,
        sigma=sigma,
    )


def _paths(cache_dir: Path, name: str, key: str) -> tuple[Path, Path]:
    stem = cache_dir / "reference" / f"{name}-{key}"
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def save_reference_stats(stats: ReferenceStats, cache_dir: Path) -> Path:
    """Write the arrays (safetensors), then the JSON that vouches for them; returns its path."""
    key = cache_key(stats.dataset_hash, stats.extractor_sha256)
    tensors_path, json_path = _paths(cache_dir, stats.name, key)
    blob = save_npz_bytes({"features": stats.features, "mu": stats.mu, "sigma": stats.sigma})
    write_bytes_atomic(tensors_path, blob)
    meta = stats.describe() | {
        "cache_format": CACHE_FORMAT,
        "key": key,
        "tensors_file": tensors_path.name,
        "tensors_sha256": hashlib.sha256(blob).hexdigest(),
    }
    write_bytes_atomic(json_path, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())
    return json_path


def _load_cached(
    cache_dir: Path, name: str, dataset_hash: str, extractor: FeatureExtractor
) -> ReferenceStats | None:
    """The cached stats if both files exist and every recorded field matches; else None."""
    key = cache_key(dataset_hash, extractor.sha256)
    tensors_path, json_path = _paths(cache_dir, name, key)
    if not (json_path.is_file() and tensors_path.is_file()):
        return None
    try:
        meta = json.loads(json_path.read_text())
        blob = tensors_path.read_bytes()
        expected = {"cache_format": CACHE_FORMAT, "key": key, "dataset_hash": dataset_hash}
        expected["extractor_sha256"] = extractor.sha256
        if any(meta.get(k) != v for k, v in expected.items()):
            return None
        if meta.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
            return None
        arrays = load_npz_bytes(blob)
        stats = ReferenceStats(
            name=name,
            dataset_hash=dataset_hash,
            extractor_name=meta["extractor_name"],
            extractor_sha256=extractor.sha256,
            features=arrays["features"],
            mu=arrays["mu"],
            sigma=arrays["sigma"],
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # corrupt: recompute
        return None
    d = stats.feature_dim
    if stats.mu.shape != (d,) or stats.sigma.shape != (d, d):
        return None
    return stats


def reference_stats(
    dataset: ImageDataset,
    extractor: FeatureExtractor,
    *,
    cache_dir: str | Path | None = None,
    batch_size: int = 500,
) -> ReferenceStats:
    """Reference statistics of `dataset` under `extractor`, from the disk cache when it matches.

    Args:
        dataset: real images (uint8) with their content hash.
        extractor: the feature extractor; its `sha256` is part of the cache key.
        cache_dir: cache root; default `default_cache_dir()`. Files go to `<cache_dir>/reference/`.
        batch_size: images per extractor call when computing.

    Returns:
        `ReferenceStats`, loaded if a file with the same dataset hash and extractor sha256 exists
        and verifies, otherwise computed and written.
    """
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = _load_cached(root, dataset.name, dataset.content_hash, extractor)
    if cached is not None:
        return cached
    stats = compute_reference_stats(dataset, extractor, batch_size=batch_size)
    save_reference_stats(stats, root)
    return stats


def mnist_reference(
    split: str, extractor: FeatureExtractor, *, cache_dir: str | Path | None = None
) -> ReferenceStats:
    """`reference_stats` of MNIST `split` ("train" or "test")."""
    return reference_stats(load_mnist(split), extractor, cache_dir=cache_dir)


def load_reference_file(path: str | Path, extractor: FeatureExtractor) -> ReferenceStats:
    """Reference statistics from one cache JSON (as `save_reference_stats` writes), verified.

    Args:
        path: the JSON file; its tensors file lies beside it.
        extractor: the extractor the statistics must have been computed with.

    Raises:
        InvalidArgumentError: another extractor, a tensors file whose sha256 differs from the
            JSON's, or a file that is not reference statistics.
    """
    json_path = Path(path)
    try:
        meta = json.loads(json_path.read_text())
        blob = (json_path.parent / meta["tensors_file"]).read_bytes()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InvalidArgumentError(f"{json_path}: not reference statistics ({e})") from None
    if meta.get("extractor_sha256") != extractor.sha256:
        raise InvalidArgumentError(
            f"{json_path}: computed with extractor {str(meta.get('extractor_sha256'))[:12]}, "
            f"not {extractor.sha256[:12]}"
        )
    if meta.get("tensors_sha256") != hashlib.sha256(blob).hexdigest():
        raise InvalidArgumentError(f"{json_path}: its tensors file does not match its sha256")
    arrays = load_npz_bytes(blob)
    return ReferenceStats(
        name=meta["name"],
        dataset_hash=meta["dataset_hash"],
        extractor_name=meta["extractor_name"],
        extractor_sha256=extractor.sha256,
        features=arrays["features"],
        mu=arrays["mu"],
        sigma=arrays["sigma"],
    )
