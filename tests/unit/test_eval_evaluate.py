"""Metrics on real MNIST with the shipped feature network, and `evaluate_images` end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation.evaluate import DUP_FRACTION, METRIC_KEYS, evaluate_images
from difforge.evaluation.features import extract
from difforge.evaluation.metrics import (
    MEMORIZATION_RATIO,
    diversity,
    fid,
    memorization,
    nn_ratios,
    precision_recall,
)
from difforge.evaluation.reference import reference_stats

N = 200  # generated-set size in these tests: > 128 feature dimensions, small enough to be quick


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train():
    return load_mnist("train")


@pytest.fixture(scope="module")
def test_set():
    return load_mnist("test")


@pytest.fixture(scope="module")
def test_feats(extractor, test_set):
    return extract(extractor.features, test_set.images[:2000])  # (2000, 128)


@pytest.fixture(scope="module")
def reference(extractor, train, tmp_path_factory):
    subset = ImageDataset("mnist-train-2000", train.images[:2000], train.labels[:2000], 10)
    return reference_stats(subset, extractor, cache_dir=tmp_path_factory.mktemp("cache"))


def noise_images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8)


def test_fid_train_vs_test_is_small_and_test_vs_noise_is_large(extractor, reference, test_feats):
    real_vs_real = fid(reference.features, test_feats)
    noise = extract(extractor.features, noise_images(1000))
    real_vs_noise = fid(test_feats, noise)
    assert real_vs_real < 0.02 * real_vs_noise
    assert fid(test_feats[:1000], test_feats[1000:]) < 0.02 * real_vs_noise


def test_precision_recall_on_mnist_classes(test_feats, test_set):
    labels = test_set.labels[:2000].numpy()
    real, fake, fake_labels = test_feats[:1000], test_feats[1000:], labels[1000:]
    assert precision_recall(real, real) == {"precision": 1.0, "recall": 1.0}
    full = precision_recall(real, fake[:800])
    no_zeros = precision_recall(real, fake[fake_labels != 0][:800])
    assert no_zeros["recall"] < full["recall"] - 0.05
    assert no_zeros["precision"] > full["precision"] - 0.05


def test_a_copied_training_image_is_memorized_and_test_images_mostly_are_not(train, test_set):
    copies = train.images[[0, 1234, 59999]]
    fresh = test_set.images[:100]
    ratios = nn_ratios(torch.cat([copies, fresh]), train.images)  # against all 60k
    assert (ratios[:3] < MEMORIZATION_RATIO).all()
    assert (ratios[3:] < MEMORIZATION_RATIO).double().mean() <= 0.03
    got = memorization(torch.cat([copies, fresh]), train.images[:5000])
    assert got["memorization_rate"] >= 1 / 103  # image 0 is among the first 5000


def test_dup_threshold_calibration(extractor, reference, test_set, test_feats):
    """Real MNIST has almost no near duplicates at DUP_FRACTION; lightly noised copies do."""
    threshold = DUP_FRACTION * reference.rms_pairwise_distance()
    assert diversity(test_feats[:1000], dup_threshold=threshold)["near_duplicate_rate"] <= 0.01
    images = test_set.images[:300]
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(-8, 9, images.shape, generator=g)
    noisy = (images.int() + noise).clamp(0, 255).to(torch.uint8)
    copies = np.concatenate([test_feats[:300], extract(extractor.features, noisy)])
    assert diversity(copies, dup_threshold=threshold)["near_duplicate_rate"] >= 0.5


def test_evaluate_images_on_real_test_images(extractor, reference, train, test_set):
    images, labels = test_set.images[:N], test_set.labels[:N]
    report = evaluate_images(images, labels, extractor, reference, train, kid_subsets=20)
    m = report["metrics"]
    assert set(m) == set(METRIC_KEYS)
    assert m["label_accuracy"] >= 0.98
    assert m["precision"] > 0.6 and m["recall"] > 0.6
    assert m["memorization_rate"] <= 0.03
    assert m["near_duplicate_rate"] <= 0.02
    assert m["kid_std"] > 0  # subsets of at most half the set differ
    assert report["extractor"]["sha256"] == extractor.sha256
    assert report["reference"]["dataset_hash"] == reference.dataset_hash
    assert report["train"] == {
        "name": "mnist-train",
        "num_images": 60000,
        "content_hash": train.content_hash,
    }
    assert report["settings"]["num_samples"] == N
    assert report["settings"]["kid_subset_size"] == N // 2
    json.dumps(report)  # a report is JSON as it stands

    noisy = evaluate_images(noise_images(N), None, extractor, reference, kid_subsets=20)["metrics"]
    assert noisy["fid"] > 20 * m["fid"]
    assert noisy["kid_mean"] > 20 * abs(m["kid_mean"])
    assert noisy["label_accuracy"] is None and noisy["memorization_rate"] is None


def test_evaluate_images_is_deterministic_and_fid_ignores_order(extractor, reference, test_set):
    images = test_set.images[:N]
    a = evaluate_images(images, None, extractor, reference, kid_subsets=5, seed=1)["metrics"]
    b = evaluate_images(images.flip(0), None, extractor, reference, kid_subsets=5, seed=1)
    assert b["metrics"]["fid"] == pytest.approx(a["fid"], rel=1e-6)
    for key in ("precision", "recall", "mean_pairwise_distance", "near_duplicate_rate"):
        assert b["metrics"][key] == pytest.approx(a[key], rel=1e-6)
    again = evaluate_images(images, None, extractor, reference, kid_subsets=5, seed=1)
    assert again["metrics"] == a


def test_evaluate_images_validates_its_inputs(extractor, reference, test_set):
    images = test_set.images[:N]
    with pytest.raises(InvalidArgumentError, match="uint8"):
        evaluate_images(images.float(), None, extractor, reference)
    with pytest.raises(InvalidArgumentError, match="more samples than feature dimensions"):
        evaluate_images(images[:50], None, extractor, reference)

    class FeaturesOnly:  # a FeatureExtractor without logits()
        name, feature_dim = "features-only", 128

        def __init__(self, sha256: str):
            self.sha256 = sha256

        def features(self, x):
            return extractor.features(x)

    with pytest.raises(InvalidArgumentError, match="recompute it"):
        evaluate_images(images, None, FeaturesOnly("0" * 64), reference)
    with pytest.raises(InvalidArgumentError, match="pass classifier="):
        evaluate_images(images, test_set.labels[:N], FeaturesOnly(extractor.sha256), reference)
