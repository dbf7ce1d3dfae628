"""MNIST scenes: deterministic bytes and hash, metadata that matches the pixels, splits never
mixed; the slots conditioning key; the U-Net's slot embedding; scene evaluation helpers."""

from __future__ import annotations

import pytest
import torch

from difforge.data import load_dataset, load_mnist
from difforge.data.scenes import EMPTY, QUAD, load_scenes, quadrants, slot_caption
from difforge.evaluation.features import load_feature_extractor
from difforge.evaluation.scenes import predict_slots, slot_accuracy
from difforge.nets import UNet, UNetConfig
from difforge.pipeline import ConditioningSpec, FieldProblem, SlotsKey

fresh = load_scenes.__wrapped__  # bypass the cache: really rebuild


def test_scenes_are_deterministic_and_content_hashed():
    a, b = fresh("train", 40, 7), fresh("train", 40, 7)
    assert torch.equal(a.images, b.images) and a.content_hash == b.content_hash
    assert a.images.dtype == torch.uint8 and a.images.shape == (40, 1, 64, 64)
    c = fresh("train", 40, 8)
    assert c.content_hash != a.content_hash
    assert load_dataset({"kind": "scenes", "n": 40, "seed": 7}).content_hash == a.content_hash


def test_metadata_matches_the_pixels():
    d = fresh("test", 60, 0)
    mnist = load_mnist("test")
    counts = (d.slots != EMPTY).sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and set(counts.tolist()) == {1, 2, 3, 4}
    q = quadrants(d.images).flatten(2).sum(2)  # (N, 4) ink per quadrant
    assert torch.equal(q > 0, d.slots != EMPTY)  # digits stay inside their own quadrant
    for i in range(len(d)):
        for digit in d.metadata(i):
            src, quad = digit["source"], digit["quadrant"]
            assert int(mnist.labels[src]) == digit["class"] == int(d.slots[i, quad])
            row, col = digit["center"]
            assert (row // QUAD) * 2 + (col // QUAD) == quad
            assert 0.85 <= digit["scale"] <= 1.11 and digit["thickness"] > 0
            assert digit["ink"] == pytest.approx(float(q[i, quad]) / 255, rel=1e-4)


def test_train_and_test_scenes_use_their_own_split():
    train, test = fresh("train", 30, 0), fresh("test", 30, 0)
    assert train.name == "scenes-train" and test.name == "scenes-test"
    assert int(test.meta["source"].max()) < 10000  # test digits index the 10k test split
    assert train.content_hash != test.content_hash


def test_the_slots_key_resolves_describes_and_drops():
    key = SlotsKey()
    spec = ConditioningSpec(keys=(key,))
    rows = spec.resolve({"slots": "_6/3_"}, 2)
    assert rows[0]["slots"].tolist() == [EMPTY, 6, 3, EMPTY] and spec.caption(rows[1]) == "_6/3_"
    assert spec.describe(rows[0]) == {"slots": [None, 6, 3, None]}
    rows = spec.resolve({"slots": [[1, 2, 3, 4], None]}, 2)
    assert spec.describe(rows[1]) == {"slots": None} and spec.caption(rows[1]) == "-"
    assert key.images([1, 2, 3, 4]) is None and key.images([[1, 2, 3, 4], None]) == 2
    with pytest.raises(FieldProblem, match="4 slots"):
        key.resolve("12", 1)
    with pytest.raises(FieldProblem, match=r"\[0, 9\]"):
        key.resolve([1, 2, 3, 10], 1)
    values = torch.tensor([[1, 2, 3, 4]] * 2000)
    dropped = key.drop(values, torch.Generator().manual_seed(0))
    nulls = (dropped == key.null).all(1)
    assert ((dropped == values).all(1) | nulls).all()  # whole vectors are dropped, or none
    assert 0.08 < nulls.float().mean() < 0.12
    assert slot_caption(torch.tensor([EMPTY, 1, 2, EMPTY])) == "_1/2_"


def test_the_unet_knows_where_each_slot_is():
    cfg = UNetConfig(in_channels=2, out_channels=2, image_size=8, base_channels=8,
                     channel_mults=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                     head_dim=8, norm_groups=4, slot_grid=2, slot_classes=11)  # fmt: skip
    torch.manual_seed(0)
    net = UNet(cfg)
    with torch.no_grad():
        net.conv_out.weight.normal_(0, 0.1)
    x, c = torch.randn(1, 2, 8, 8), torch.zeros(1)
    a = net(x, c, {"slots": torch.tensor([[1, 10, 10, 10]])})
    b = net(x, c, {"slots": torch.tensor([[10, 1, 10, 10]])})  # the same digit elsewhere
    assert not torch.allclose(a, b)
    null = torch.full((1, 4), 11)
    assert torch.equal(net(x, c, None), net(x, c, {"slots": null}))  # missing = the null
    with pytest.raises(Exception, match="slots must lie"):
        net(x, c, {"slots": torch.tensor([[12, 0, 0, 0]])})


def test_real_scenes_are_read_back_by_the_slot_classifier():
    d = fresh("test", 100, 0)
    acc = slot_accuracy(predict_slots(load_feature_extractor(), d.images), d.slots)
    assert acc["empty_accuracy"] == 1.0 and acc["digit_accuracy"] > 0.97
    blank = torch.zeros(2, 1, 64, 64, dtype=torch.uint8)
    assert predict_slots(load_feature_extractor(), blank).eq(EMPTY).all()
