"""Model folders: strict safetensors-only loading, integrity errors, seeded sampling, PNG provenance."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import difforge
from difforge.core import InvalidArgumentError
from difforge.model import (
    ModelConfig,
    ModelIntegrityError,
    build_network,
    save_grid_png,
    save_model,
    save_samples_png,
)
from tests.helpers import TINY_NET

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model_config(**overrides) -> ModelConfig:
    fields = {
        "name": "tiny",
        "net": TINY_NET,
        "process": {"kind": "ve"},
        "parameterization": "edm",
        "num_classes": 3,
        "image_shape": (1, 8, 8),
        "sampling": {"steps": 3},
    }
    return ModelConfig(**(fields | overrides))


@pytest.fixture
def model_dir(tmp_path):
    config = tiny_model_config()
    torch.manual_seed(0)
    net = build_network(config.net)
    return save_model(tmp_path / "tiny", config, net.state_dict(), "# tiny\n")


def test_roundtrip(model_dir):
    m = difforge.load(model_dir)
    files = json.loads((model_dir / "manifest.json").read_text())["files"]
    assert sorted(p.name for p in model_dir.iterdir()) == [
        "README.md",
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    assert m.sha256 == files["model.safetensors"] and m.name == "tiny"
    assert (m.num_classes, m.image_shape) == (3, (1, 8, 8))
    assert not m.net.training and not any(p.requires_grad for p in m.net.parameters())
    torch.manual_seed(0)
    fresh = build_network(m.config.net)
    assert all(
        torch.equal(a, b)
        for a, b in zip(fresh.state_dict().values(), m.net.state_dict().values(), strict=True)
    )
    # Loading draws nothing from the global RNG.
    state = torch.get_rng_state()
    difforge.load(model_dir / "config.json")
    assert torch.equal(state, torch.get_rng_state())


def test_sample_is_seeded_per_image(model_dir):
    m = difforge.load(model_dir)
    batch = m.sample(labels=[0, 1, 2], seed=7, guidance=2.0)
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (3, 1, 8, 8)
    assert batch.seeds == (7, 8, 9) and batch.labels == (0, 1, 2)
    assert batch.nfe == 3 and batch.steps == 3
    alone = m.sample(labels=[2], seeds=[9], guidance=2.0)
    assert torch.equal(alone.images[0], batch.images[2])
    cycled = m.sample(n=4)  # no labels: classes cycle; no seed: a random one, reported
    assert cycled.labels == (0, 1, 2, 0)
    s0 = cycled.seeds[0]
    assert cycled.seeds == (s0, s0 + 1, s0 + 2, s0 + 3) and 0 <= s0 < 2**32
    assert torch.equal(m.sample(n=4, seed=s0).images, cycled.images)  # the reported seed replays
    assert m.sample(labels=[1], n=2).labels == (1, 1)
    assert m.sample(labels=[None, 1], seed=0).labels == (None, 1)  # None: the null class


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": [3]}, r"labels.0: must be an integer in \[0, 2\]"),
        ({"labels": [0, 1], "n": 3}, "labels: has 2 entries for n = 3"),
        ({"seeds": [1, 2], "n": 3}, "seeds: has 2 entries for n = 3"),
        ({"n": 0}, r"n: must be in \[1, inf\]"),
        ({"sampler": "plms"}, "unknown sampler"),
        ({"steps": 0}, r"steps: must be in \[1, inf\]"),
        ({"max_order": 2}, "not an option of sampler 'dpmpp_2m'"),
        ({"sampler": "ipndm", "max_order": 2.5}, "must be int"),
    ],
)
def test_sample_rejects_bad_arguments(model_dir, kwargs, message):
    with pytest.raises(InvalidArgumentError, match=message):
        difforge.load(model_dir).sample(**kwargs)


def test_pickles_are_refused(tmp_path, model_dir):
    pt = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(1)}, pt)
    with pytest.raises(ModelIntegrityError, match="pickle"):
        difforge.load(pt)
    folder = tmp_path / "legacy"
    folder.mkdir()
    (folder / "pytorch_model.bin").write_bytes(pt.read_bytes())
    with pytest.raises(ModelIntegrityError, match=r"pickle weights \(pytorch_model\.bin\)"):
        difforge.load(folder)


def test_a_modified_file_fails_the_manifest(model_dir):
    weights = model_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(
        ModelIntegrityError, match=r"model\.safetensors is corrupted or was modified"
    ):
        difforge.load(model_dir)


def _rehash(folder):
    from difforge.model import sha256_file

    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {n: sha256_file(folder / n) for n in manifest["files"]}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_truncated_file_is_a_clear_error(model_dir):
    weights = model_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelIntegrityError, match="corrupted or was modified"):
        difforge.load(model_dir)
    _rehash(model_dir)  # even with a matching manifest, a torn file is refused
    with pytest.raises(ModelIntegrityError, match="unreadable"):
        difforge.load(model_dir)


def test_missing_manifest_is_refused(model_dir):
    (model_dir / "manifest.json").unlink()
    with pytest.raises(ModelIntegrityError, match=r"no manifest\.json"):
        difforge.load(model_dir)


def test_missing_and_unexpected_keys_are_listed(tmp_path):
    config = tiny_model_config()
    weights = build_network(config.net).state_dict()
    dropped = sorted(weights)[0]
    del weights[dropped]
    weights["extra.weight"] = torch.zeros(2)
    save_model(tmp_path / "m", config, weights, "")
    with pytest.raises(ModelIntegrityError) as e:
        difforge.load(tmp_path / "m")
    assert f"missing keys: {dropped}" in str(e.value) and "unexpected keys: extra.weight" in str(
        e.value
    )


def test_a_config_for_another_net_is_a_shape_error(tmp_path, model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    config["net"]["config"]["base_channels"] = 4
    (model_dir / "config.json").write_text(json.dumps(config))
    _rehash(model_dir)
    with pytest.raises(ModelIntegrityError, match="shape mismatches"):
        difforge.load(model_dir)


def test_nonfinite_weights_are_not_saved(tmp_path):
    with pytest.raises(ModelIntegrityError, match="non-finite"):
        save_model(tmp_path / "m", tiny_model_config(), {"w": torch.tensor([float("nan")])}, "")
    assert not (tmp_path / "m").exists()


def test_grid_png_carries_provenance(tmp_path, model_dir):
    m = difforge.load(model_dir)
    samples = m.sample(labels=[0, 1, 2, 0, 1, 2], seed=3)
    path = save_samples_png(m, samples, tmp_path / "grid.png")
    with Image.open(path) as im:
        text = dict(im.text)
        assert im.size[0] > 3 * 56  # upscaled, 3 per row (one per class)
    assert text["synthetic"] == "true"
    assert text["model"] == "tiny" and text["model_sha256"] == m.sha256
    assert json.loads(text["seeds"]) == [3, 4, 5, 6, 7, 8]
    assert json.loads(text["labels"]) == [0, 1, 2, 0, 1, 2]
    assert {"sampler", "steps", "guidance", "created"} <= set(text)


def test_grid_png_rejects_float_images(tmp_path):
    with pytest.raises(InvalidArgumentError, match="uint8"):
        save_grid_png(tmp_path / "g.png", torch.zeros(2, 1, 4, 4))


def test_extra_files_are_in_the_manifest(tmp_path):
    """An eval report shipped with the model (save_model extra=) is covered by the manifest."""
    config = tiny_model_config()
    net = build_network(config.net)
    report = json.dumps({"metrics": {"fid": 1.0}})
    folder = save_model(tmp_path / "m", config, net.state_dict(), "", {"eval_x.json": report})
    files = json.loads((folder / "manifest.json").read_text())["files"]
    assert set(files) == {"README.md", "config.json", "model.safetensors", "eval_x.json"}
    difforge.load(folder)
    (folder / "eval_x.json").write_text(report.replace("1.0", "2.0"))
    with pytest.raises(ModelIntegrityError, match=r"eval_x\.json is corrupted or was modified"):
        difforge.load(folder)
    with pytest.raises(ModelIntegrityError, match="bad file name"):
        save_model(tmp_path / "n", config, net.state_dict(), "", {"../x.json": report})
