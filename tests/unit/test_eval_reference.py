"""Reference statistics: values, and a disk cache keyed by dataset hash + extractor sha256."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation import reference as ref_mod
from difforge.evaluation.features import FeatureNet, FeatureNetConfig, TorchFeatureExtractor
from difforge.evaluation.reference import cache_key, reference_stats


def tiny_extractor(sha: str = "a" * 64) -> TorchFeatureExtractor:
    torch.manual_seed(0)
    return TorchFeatureExtractor(FeatureNet(FeatureNetConfig(channels=(4, 8), feature_dim=6)), sha)


def small_set(n: int = 200, start: int = 0) -> ImageDataset:
    test = load_mnist("test")
    return ImageDataset(
        name=f"mnist-test-{start}-{n}",
        images=test.images[start : start + n],
        labels=test.labels[start : start + n],
        num_classes=10,
    )


@pytest.fixture
def count_computes(monkeypatch):
    calls = []
    real = ref_mod.compute_reference_stats

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(ref_mod, "compute_reference_stats", counting)
    return calls


def test_stats_are_the_mean_and_covariance_of_the_features(tmp_path):
    data, ext = small_set(), tiny_extractor()
    stats = reference_stats(data, ext, cache_dir=tmp_path)
    feats = ext.features(data.as_float()).double().numpy()
    np.testing.assert_allclose(stats.features, feats, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats.mu, feats.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False), rtol=1e-4, atol=1e-6)
    assert stats.describe()["num_samples"] == 200
    assert stats.describe()["dataset_hash"] == data.content_hash


def test_second_call_reads_the_cache_and_files_are_safetensors_and_json(tmp_path, count_computes):
    data, ext = small_set(), tiny_extractor()
    first = reference_stats(data, ext, cache_dir=tmp_path)
    second = reference_stats(data, ext, cache_dir=tmp_path)
    assert len(count_computes) == 1
    np.testing.assert_array_equal(first.sigma, second.sigma)
    files = sorted(p.suffix for p in (tmp_path / "reference").iterdir())
    assert files == [".json", ".safetensors"]
    meta = json.loads(next((tmp_path / "reference").glob("*.json")).read_text())
    assert meta["key"] == cache_key(data.content_hash, ext.sha256)
    assert meta["extractor_sha256"] == ext.sha256


def test_a_different_extractor_or_dataset_recomputes(tmp_path, count_computes):
    data = small_set()
    reference_stats(data, tiny_extractor("a" * 64), cache_dir=tmp_path)
    reference_stats(data, tiny_extractor("b" * 64), cache_dir=tmp_path)
    assert len(count_computes) == 2
    reference_stats(small_set(start=1), tiny_extractor("a" * 64), cache_dir=tmp_path)
    assert len(count_computes) == 3
    reference_stats(data, tiny_extractor("a" * 64), cache_dir=tmp_path)
    assert len(count_computes) == 3


def test_a_corrupted_or_mislabelled_cache_file_is_recomputed(tmp_path, count_computes):
    data, ext = small_set(), tiny_extractor()
    good = reference_stats(data, ext, cache_dir=tmp_path)
    tensors = next((tmp_path / "reference").glob("*.safetensors"))
    blob = bytearray(tensors.read_bytes())
    blob[-1] ^= 0xFF
    tensors.write_bytes(bytes(blob))
    again = reference_stats(data, ext, cache_dir=tmp_path)
    assert len(count_computes) == 2
    np.testing.assert_array_equal(good.mu, again.mu)
    meta_path = next((tmp_path / "reference").glob("*.json"))
    meta = json.loads(meta_path.read_text())
    meta["extractor_sha256"] = "c" * 64
    meta_path.write_text(json.dumps(meta))
    reference_stats(data, ext, cache_dir=tmp_path)
    assert len(count_computes) == 3


def test_reference_images_must_be_uint8(tmp_path):
    data = small_set(20)
    floats = ImageDataset("floats", data.as_float(), data.labels, 10)
    with pytest.raises(InvalidArgumentError, match="uint8"):
        reference_stats(floats, tiny_extractor(), cache_dir=tmp_path)
