"""The shipped MNIST feature network and its loader: accuracy, integrity checks, round trips."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.data.mnist import load_mnist
from difforge.evaluation.features import (
    MANIFEST_FILE,
    WEIGHTS_FILE,
    Classifier,
    FeatureExtractor,
    FeatureNet,
    FeatureNetConfig,
    WeightsIntegrityError,
    default_features_dir,
    extract,
    load_feature_extractor,
    save_feature_net,
    sha256_bytes,
)
from difforge.evaluation.metrics import label_accuracy

TINY = FeatureNetConfig(name="tiny-test-net", channels=(4, 8), feature_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_shipped_net_classifies_the_test_set(extractor):
    test = load_mnist("test")
    logits = extract(extractor.logits, test.images, batch_size=1000)
    assert label_accuracy(logits, test.labels) >= 0.99


def test_shipped_net_satisfies_the_protocols(extractor):
    assert isinstance(extractor, FeatureExtractor)
    assert isinstance(extractor, Classifier)
    assert extractor.name == "difforge-mnist-features-v1"
    weights = (default_features_dir() / WEIGHTS_FILE).read_bytes()
    assert extractor.sha256 == sha256_bytes(weights)
    x = torch.rand(3, 1, 28, 28) * 2 - 1
    assert extractor.features(x).shape == (3, extractor.feature_dim)
    assert extractor.logits(x).shape == (3, 10)
    with pytest.raises(InvalidArgumentError, match="expected images"):
        extractor.features(torch.zeros(3, 28, 28))


def test_shipped_folder_is_small_and_documented(extractor):
    folder = default_features_dir()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 2_000_000
    readme = (folder / "README.md").read_text()
    assert extractor.sha256 in readme
    assert load_mnist("train").content_hash in readme
    assert "scripts/train_feature_net.py" in readme
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    assert manifest["files"][WEIGHTS_FILE] == extractor.sha256


def test_loader_refuses_a_tampered_weights_file(tmp_path):
    folder = tmp_path / "features"
    shutil.copytree(default_features_dir(), folder)
    data = bytearray((folder / WEIGHTS_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one weight
    (folder / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(WeightsIntegrityError, match="does not match the manifest"):
        load_feature_extractor(folder)


def test_loader_refuses_a_folder_without_manifest(tmp_path):
    folder = tmp_path / "features"
    shutil.copytree(default_features_dir(), folder)
    (folder / MANIFEST_FILE).unlink()
    with pytest.raises(WeightsIntegrityError, match="no manifest"):
        load_feature_extractor(folder)
    with pytest.raises(DifforgeError, match="not found"):
        load_feature_extractor(tmp_path / "nowhere")


def test_round_trip_of_a_tiny_net(tmp_path):
    torch.manual_seed(0)
    net = FeatureNet(TINY).eval()
    sha = save_feature_net(net, tmp_path, training={"note": "untrained"})
    loaded = load_feature_extractor(tmp_path)
    assert loaded.sha256 == sha and loaded.name == "tiny-test-net"
    x = torch.rand(5, 1, 28, 28) * 2 - 1
    torch.testing.assert_close(loaded.features(x), net.features(x).detach())


def test_loader_is_strict_about_tensor_names(tmp_path):
    net = FeatureNet(TINY)
    save_feature_net(net, tmp_path, training={})
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    save_file(state, str(tmp_path / WEIGHTS_FILE))
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["files"][WEIGHTS_FILE] = sha256_bytes((tmp_path / WEIGHTS_FILE).read_bytes())
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(DifforgeError, match="does not fit the architecture"):
        load_feature_extractor(tmp_path)


def test_extract_does_not_depend_on_batch_size(extractor):
    images = load_mnist("test").images[:37]
    a = extract(extractor.features, images, batch_size=5)
    b = extract(extractor.features, images, batch_size=500)
    assert a.shape == (37, extractor.feature_dim)
    torch.testing.assert_close(torch.from_numpy(a), torch.from_numpy(b), rtol=1e-4, atol=1e-4)


def test_config_rejects_bad_values():
    with pytest.raises(InvalidArgumentError, match="unknown feature-net config fields"):
        FeatureNetConfig.from_dict({"channels": [4], "depth": 3})
    with pytest.raises(InvalidArgumentError, match="dropout"):
        FeatureNetConfig(dropout=1.5)
