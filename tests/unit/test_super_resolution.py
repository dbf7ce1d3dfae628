"""Super-resolution: the low_res conditioning key, the U-Net's low-res input, upscale, and the
base -> upsampler cascade (tiny random models): shapes, strict loading, the same bytes batched or
alone, limits and errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from difforge.common.png import png_bytes
from difforge.core.errors import InvalidArgumentError
from difforge.data import downsample
from difforge.nets import build_net
from difforge.pipeline import (
    ConditioningSpec,
    ModelIntegrityError,
    RequestInvalid,
    RequestLimits,
    load,
)
from difforge.pipeline.cascade import Cascade, CascadeConfig, save_cascade
from difforge.samplers.noise import stream_seeds
from tests.upscale_fixtures import (
    LOW_RES,
    UP_UNET,
    low_res_images,
    make_tiny_cascade,
    make_tiny_upsampler,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return make_tiny_cascade(tmp_path_factory.mktemp("sr"))


def test_downsample_is_the_block_mean():
    x = torch.tensor([[[[0, 2, 10, 10], [4, 6, 10, 11], [0, 0, 0, 0], [0, 0, 0, 255]]]])
    out = downsample(x.to(torch.uint8), 2)
    assert out.tolist() == [[[[3, 10], [0, 64]]]]  # 10.25 -> 10, 63.75 -> 64
    with pytest.raises(InvalidArgumentError, match="divisible"):
        downsample(torch.zeros(1, 1, 5, 5, dtype=torch.uint8), 2)


def test_low_res_key_rows_training_augmentation_and_null():
    spec = ConditioningSpec(keys=(LOW_RES,))
    img = low_res_images(2)
    rows = spec.resolve({"low_res": img}, 2)
    assert rows[0]["low_res"].shape == (2, 8, 8)  # image + level channel
    assert torch.equal(LOW_RES.pixels(rows[1]["low_res"]), img[1])  # exact round trip
    assert float(rows[0]["low_res"][-1, 0, 0]) == pytest.approx(0.1)
    d = spec.describe(rows[0])["low_res"]
    assert d["level"] == 0.1 and len(d["sha256"]) == 64
    batch = spec.from_batch({"low_res": img})
    g = torch.Generator().manual_seed(0)
    aug = LOW_RES.model_copy(update={"dropout": 0.0}).drop(batch["low_res"], g)
    level = aug[:, -1, 0, 0]
    assert ((level >= 0) & (level <= 0.5)).all() and (aug[:, -1] == level[:, None, None]).all()
    noise = (aug[:, 0] - batch["low_res"][:, 0]) / level[:, None, None]
    assert 0.5 < noise.std() < 1.5  # z = x + s * eps
    dropped = LOW_RES.model_copy(update={"dropout": 1.0}).drop(batch["low_res"], g)
    assert torch.equal(dropped, torch.stack([LOW_RES.null_row()] * 2))
    assert spec.describe({"low_res": LOW_RES.null_row()})["low_res"] is None


def test_low_res_key_errors():
    spec = ConditioningSpec(keys=(LOW_RES,))
    assert torch.equal(spec.resolve({}, 2)[1]["low_res"], LOW_RES.null_row())  # absent: null
    with pytest.raises(InvalidArgumentError, match="is 16x16; the model takes 8x8"):
        spec.resolve({"low_res": png_bytes(torch.zeros(1, 16, 16, dtype=torch.uint8))}, 1)
    with pytest.raises(InvalidArgumentError, match="uint8 of shape"):
        spec.resolve({"low_res": torch.zeros(1, 8, 8)}, 1)
    with pytest.raises(InvalidArgumentError, match="3 entries for n = 2"):
        spec.resolve({"low_res": [low_res_images(1)[0]] * 3}, 2)


def test_unet_takes_the_low_res_image_and_level():
    net = build_net("unet", UP_UNET)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    x, c = torch.randn(2, 1, 16, 16), torch.zeros(2)
    row = torch.stack([LOW_RES.row(i) for i in low_res_images(2)])  # (2, 2, 8, 8)
    out = net(x, c, {"low_res": row})
    assert out.shape == (2, 1, 16, 16)
    other = row.clone()
    other[:, -1] = 0.4  # another augmentation level
    assert not torch.allclose(net(x, c, {"low_res": other}), out)
    assert not torch.allclose(net(x, c, None), out)  # missing = the null
    with pytest.raises(InvalidArgumentError, match="low_res must be"):
        net(x, c, {"low_res": row[:, :1]})


def test_upscale_shapes_and_same_bytes_batched_or_alone(folders):
    _, _, up_dir = folders
    up = load(up_dir)
    img = low_res_images(3)
    batch = up.upscale(img, seeds=[5, 2**40, 0])
    assert batch.images.shape == (3, 1, 16, 16) and batch.images.dtype == torch.uint8
    for i, s in enumerate([5, 2**40, 0]):
        alone = up.upscale(img[i], seed=s)
        assert torch.equal(alone.images[0], batch.images[i])
    png = up.upscale(png_bytes(img[1]), seed=2**40)  # a PNG is the same input
    assert torch.equal(png.images[0], batch.images[1])
    assert not torch.equal(up.upscale(img[1], seed=6).images[0], batch.images[1])
    hi = up.upscale(img[1], seed=2**40, level=0.4)
    assert hi.conditioning["low_res"][0]["level"] == 0.4
    assert not torch.equal(hi.images[0], batch.images[1])


def test_upscale_errors(folders):
    _, base_dir, up_dir = folders
    up = load(up_dir)
    with pytest.raises(RequestInvalid, match="the limit is 50"):
        up.upscale(png_bytes(low_res_images(1)[0]), limits=RequestLimits(max_image_bytes=50))
    with pytest.raises(InvalidArgumentError, match="not an upsampler"):
        load(base_dir).upscale(low_res_images(1))
    with pytest.raises(InvalidArgumentError, match="level must be"):
        up.upscale(low_res_images(1), level=-1.0)


def test_cascade_is_base_then_upsampler_per_seed(folders):
    cascade_dir, base_dir, up_dir = folders
    cascade = load(cascade_dir)
    assert isinstance(cascade, Cascade) and cascade.image_shape == (1, 16, 16)
    seeds = [3, 11, 2**33]
    out = cascade.sample(labels=[1, 2, 3], seeds=seeds)
    assert out.images.shape == (3, 1, 16, 16)
    base = load(base_dir).sample(labels=[1, 2, 3], seeds=seeds)
    up = load(up_dir).upscale(base.images, seeds=stream_seeds(seeds, 3), steps=2)
    assert torch.equal(out.images, up.images)  # the documented composition, byte for byte
    assert out.nfe == base.nfe + up.nfe
    alone = cascade.sample(labels=[2], seeds=[11])
    assert torch.equal(alone.images[0], out.images[1])
    assert cascade.upsampler.sha256 == load(up_dir).sha256
    by_cascade = cascade.upscale(base.images[:1], seed=1).images  # its upsampler stage
    assert torch.equal(by_cascade, load(up_dir).upscale(base.images[:1], seed=1).images)


def test_cascade_loading_is_strict(folders, tmp_path):
    cascade_dir, base_dir, up_dir = folders
    bad = tmp_path / "bad"
    shutil.copytree(cascade_dir, bad)
    (bad / "upsampler" / "README.md").write_text("changed\n")
    with pytest.raises(ModelIntegrityError, match="modified"):
        load(bad)
    # another upsampler in place of the recorded one: refused by hash, naming both
    other = make_tiny_upsampler(tmp_path / "other", seed=9)
    swapped = tmp_path / "swapped"
    save_cascade(swapped, base_dir, other)
    config = CascadeConfig.model_validate_json((cascade_dir / "pipeline.json").read_text())
    pipeline = json.loads((swapped / "pipeline.json").read_text())
    pipeline["upsampler"]["sha256"] = config.upsampler.sha256
    (swapped / "pipeline.json").write_text(json.dumps(pipeline))
    from difforge.pipeline.artifact import _write_manifest

    (swapped / "manifest.json").unlink()
    _write_manifest(swapped, "difforge-cascade/1")
    with pytest.raises(ModelIntegrityError, match=r"stage 'upsampler'.*records"):
        load(swapped)
    with pytest.raises(ModelIntegrityError, match="takes low_res images"):
        save_cascade(tmp_path / "mismatch", up_dir, up_dir)


def test_downsampled_and_super_resolution_datasets():
    from difforge.data import load_dataset

    small = load_dataset({"kind": "downsampled", "of": "mnist:test", "factor": 2})
    pairs = load_dataset("super_resolution:mnist:test")
    assert small.sample_shape == (1, 14, 14) and small.num_classes == 10
    assert pairs.sample_shape == (1, 28, 28) and pairs.labels is None  # reads low_res only
    assert torch.equal(pairs.fields()["low_res"], small.images)
    assert torch.equal(small.images[:4], downsample(pairs.images[:4], 2))


def test_an_upsampler_trains_exports_and_upscales(tmp_path):
    """The training loop reads the low_res field through the spec (augmentation and dropout in
    `drop`); the exported v2 pipeline upscales."""
    from difforge.data import SuperResolutionDataset
    from difforge.training import parse_config, train

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 1, 16, 16), generator=g).to(torch.uint8)
    data = SuperResolutionDataset(
        "noise16", images, None, 0, low_res=downsample(images, 2)
    )  # fmt: skip
    config = parse_config(
        {
            "net": {"kind": "unet", "config": UP_UNET.to_dict()},
            "dataset": "noise16",
            "conditioning": {"keys": [LOW_RES.model_dump()]},
            "batch_size": 8,
            "max_steps": 2,
            "checkpoint_every": 2,
            "sampling": {"steps": 2, "guidance": 1.0},
        }
    )
    result = train(config, tmp_path / "run", dataset=data, progress=False)
    up = load(result.model_dir)
    assert up.spec.keys[0].kind == "low_res"
    out = up.upscale(downsample(images[:2], 2), seed=0)
    assert out.images.shape == (2, 1, 16, 16)
