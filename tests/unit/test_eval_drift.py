"""Drift statistics (difforge.evaluation.drift): the class-mix distance, a window's distances from
a reference, and where the reference comes from (statistics files, evaluation reports)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from difforge.core.errors import InvalidArgumentError
from difforge.evaluation.drift import (
    DriftReference,
    class_distance,
    load_drift_reference,
    report_class_probs,
    uniform_classes,
    window_drift,
)
from difforge.evaluation.metrics import feature_stats, kid
from difforge.evaluation.reference import ReferenceStats, save_reference_stats

D = 8


class FakeExtractor:
    name, sha256, feature_dim = "fake", "f" * 64, D


def reference(n: int = 400, seed: int = 0) -> DriftReference:
    feats = np.random.default_rng(seed).normal(size=(n, D)).astype(np.float32)
    mu, sigma = feature_stats(feats)
    stats = ReferenceStats("toy", "sha256:toy", "fake", "f" * 64, feats, mu, sigma)
    return DriftReference(stats, uniform_classes(4), 10, 3.0, "test")


def test_class_distance_is_zero_for_the_same_mix_and_one_for_a_disjoint_one():
    probs = uniform_classes(4)  # 5 bins: 4 classes + the null class
    same = class_distance([0, 1, 2, 3] * 25, probs)
    assert same["tv"] == pytest.approx(0.0) and same["chi2_p"] == pytest.approx(1.0)
    one = class_distance([2] * 40, probs)
    assert one["tv"] == pytest.approx(0.75) and one["chi2_p"] < 1e-10
    null = class_distance([4] * 10, probs)  # all unconditional: mass where the reference has none
    assert null["tv"] == pytest.approx(1.0) and null["chi2_p"] == 0.0
    with pytest.raises(InvalidArgumentError, match=r"\[0, 5\)"):
        class_distance([5], probs)


def test_window_drift_separates_a_shifted_window_and_matches_the_shared_metrics():
    ref = reference()
    rng = np.random.default_rng(1)
    same = rng.normal(size=(200, D))
    shifted = same + 1.5  # every feature moved by 1.5 standard deviations
    a = window_drift(same, ref, labels=[0, 1, 2, 3] * 50, steps=[10] * 200, guidance=[3.0] * 200)
    b = window_drift(shifted, ref, labels=[0] * 200)
    assert a["samples"] == b["samples"] == 200
    assert a["fid"] < 1.0 < D * 1.5**2 * 0.9 < b["fid"]  # ||mu shift||^2 = 8 * 2.25 = 18
    assert b["kid"] > 10 * max(a["kid"], 1e-3)
    size = min(200, 400)
    assert a["kid"] == pytest.approx(
        kid(ref.stats.features, same, num_subsets=20, subset_size=size)["mean"]
    )
    assert a["class_tv"] == pytest.approx(0.0) and b["class_tv"] == pytest.approx(0.75)
    assert (a["steps_mean"], a["guidance_mean"]) == (10.0, 3.0)
    assert b["steps_mean"] is None


def test_small_windows_have_kid_but_no_fid():
    small = window_drift(np.zeros((D, D)) + np.eye(D), reference())
    assert small["fid"] is None and small["kid"] is not None and small["samples"] == D
    with pytest.raises(InvalidArgumentError, match=r"\(n, 8\)"):
        window_drift(np.zeros((10, 3)), reference())


def test_reference_from_a_statistics_file_is_verified(tmp_path):
    stats = reference().stats
    path = save_reference_stats(stats, tmp_path)
    ref = load_drift_reference(
        path, FakeExtractor(), num_classes=4, default_steps=20, default_guidance=2.0
    )
    assert np.array_equal(ref.stats.features, stats.features) and ref.steps == 20
    assert ref.class_probs.tolist() == [0.25, 0.25, 0.25, 0.25, 0.0]

    class Other(FakeExtractor):
        sha256 = "0" * 64

    with pytest.raises(InvalidArgumentError, match="computed with extractor"):
        load_drift_reference(path, Other(), num_classes=4, default_steps=20, default_guidance=2.0)
    tensors = path.with_suffix(".safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(InvalidArgumentError, match="does not match its sha256"):
        load_drift_reference(
            path, FakeExtractor(), num_classes=4, default_steps=20, default_guidance=2.0
        )


def test_a_report_gives_its_label_mix_and_settings_and_must_name_its_reference(tmp_path):
    report = {
        "repeats": [{"label_counts": [30, 10, 0, 0]}, {"label_counts": [30, 10, 0, 0]}],
        "sampler": {"steps": 12, "guidance": 1.5},
        "reference": {"name": "cifar-test", "extractor_sha256": "f" * 64},
    }
    assert report_class_probs(report, 4).tolist() == [0.75, 0.25, 0.0, 0.0, 0.0]
    assert report_class_probs({"repeats": []}, 4) is None
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    with pytest.raises(InvalidArgumentError, match="not an MNIST split"):
        load_drift_reference(
            path, FakeExtractor(), num_classes=4, default_steps=20, default_guidance=2.0
        )
    report["reference"] = {"name": "mnist-test", "extractor_sha256": "0" * 64}
    path.write_text(json.dumps(report))
    with pytest.raises(InvalidArgumentError, match="measured with extractor"):
        load_drift_reference(
            path, FakeExtractor(), num_classes=4, default_steps=20, default_guidance=2.0
        )


def test_the_registry_gives_a_versions_latest_report_whole(tmp_path):
    from difforge.registry import Registry
    from difforge.registry.reports import latest_report
    from tests.integration.serving_fixtures import make_tiny_model

    reg = Registry(f"sqlite:///{tmp_path}/registry.db", tmp_path / "artifacts")
    try:
        folder = make_tiny_model(tmp_path / "tiny")
        reg.register(folder, name="tiny")
        assert latest_report(reg, "tiny", 1) is None
        first = {"metrics": {"fid": 20.0}, "reference": {"name": "mnist-test"}}
        second = {"metrics": {"fid": 10.0}, "repeats": [{"label_counts": [1] * 10}]}
        reg.attach_report("tiny", 1, first)
        reg.attach_report("tiny", 1, second)
        assert latest_report(reg, "tiny", 1) == second
        assert latest_report(reg, "tiny", 2) is None and latest_report(reg, "other", 1) is None
    finally:
        reg.close()


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save")
def test_drift_fid_and_kid_match_torchmetrics_with_a_custom_feature_module():
    """Parity with the kept library: torchmetrics' FID and KID over the same features (its
    `feature` argument takes any nn.Module; here the features are the module's input)."""
    torch = pytest.importorskip("torch")
    fid_mod = pytest.importorskip("torchmetrics.image.fid")
    kid_mod = pytest.importorskip("torchmetrics.image.kid")

    class Given(torch.nn.Module):
        num_features = D

        def forward(self, x):
            return x.double()

    ref = reference(n=300)
    window = np.random.default_rng(2).normal(0.3, 1.2, size=(150, D))
    ours = window_drift(window, ref)
    real, fake = torch.from_numpy(ref.stats.features.astype(np.float64)), torch.from_numpy(window)
    tm_fid = fid_mod.FrechetInceptionDistance(feature=Given()).double()
    tm_fid.update(real, real=True)
    tm_fid.update(fake, real=False)
    assert ours["fid"] == pytest.approx(float(tm_fid.compute()), rel=1e-6)
    # one subset of every row: no subset draw, so both compute the same unbiased MMD^2
    real_150 = real[:150]
    exact = kid(ref.stats.features[:150], window, num_subsets=1, subset_size=150)["mean"]
    tm_kid = kid_mod.KernelInceptionDistance(feature=Given(), subsets=1, subset_size=150)
    tm_kid.update(real_150, real=True)
    tm_kid.update(fake, real=False)
    assert exact == pytest.approx(float(tm_kid.compute()[0]), rel=1e-6)
