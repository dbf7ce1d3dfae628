"""The masked_image conditioning key (mask + known pixels as extra input channels), the random
training masks, and the U-Net's extra input channels with conv_in widened at zero."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.nets import UNetConfig, build_net
from difforge.pipeline import ConditioningSpec
from difforge.pipeline.conditioning import ClassKey, FieldProblem, MaskedImageKey, random_mask
from difforge.training.inpaint import widen_conv_in

KEY = MaskedImageKey(image_shape=(1, 8, 8))
SPEC = ConditioningSpec(keys=(ClassKey(num_classes=10), KEY))


def test_null_row_is_nothing_known_and_a_row_hides_the_generated_pixels():
    null = KEY.null_row()
    assert null.shape == (2, 8, 8) and bool((null[0] == 1).all()) and not null[1].any()
    image = torch.rand(1, 8, 8) * 2 - 1
    mask = torch.zeros(1, 8, 8)
    mask[:, 4:] = 1
    row = KEY.row(image, mask)
    assert torch.equal(row[0:1], mask)
    assert torch.equal(row[1, :4], image[0, :4]) and not row[1, 4:].any()
    assert KEY.describe_row(row) == "init_image*mask" and KEY.describe_row(null) is None


def test_the_key_takes_no_request_value_of_its_own():
    assert all(torch.equal(r, KEY.null_row()) for r in KEY.resolve(None, 3))
    assert len(KEY.resolve("init_image*mask", 2)) == 2  # what describe_row wrote replays
    with pytest.raises(FieldProblem, match="set from init_image and mask"):
        KEY.resolve([[0.0]], 1)
    rows = SPEC.resolve({"labels": 3}, 2)
    assert torch.equal(rows[0]["inpaint"], KEY.null_row()) and int(rows[1]["labels"]) == 3


def test_fill_from_edit_sets_rows_and_keeps_the_known_pixels_in_guidance():
    rows = SPEC.resolve({"labels": [1, 2]}, 2)
    images = [torch.full((1, 8, 8), 0.5), torch.full((1, 8, 8), -0.5)]
    masks = [torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]
    filled, uncond = SPEC.fill_from_edit(rows, None, images, masks)
    assert torch.equal(filled[0]["inpaint"], KEY.row(images[0], masks[0]))
    assert int(filled[1]["labels"]) == 2
    for f, u in zip(filled, uncond, strict=True):
        assert torch.equal(u["inpaint"], f["inpaint"])  # same known pixels in both branches
        assert int(u["labels"]) == 10  # the null class: guidance contrasts the label only
    assert SPEC.fill_from_edit(rows, None, images, None) == (rows, None)  # img2img: unchanged
    plain = ConditioningSpec.for_classes(10)
    assert plain.fill_from_edit(rows, None, images, masks) == (rows, None)


def test_random_masks_are_binary_seeded_and_of_each_shape():
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    for shape in ("half", "rectangle", "strokes"):
        a = random_mask((shape,), (28, 28), g())
        assert a.shape == (1, 28, 28) and set(a.unique().tolist()) <= {0.0, 1.0}
        assert 0 < a.mean() < 1, shape
        assert torch.equal(a, random_mask((shape,), (28, 28), g()))
    half = random_mask(("half",), (8, 8), g())
    assert half.sum() == 32  # exactly half of the pixels


def test_training_rows_drop_to_null_at_the_dropout_rate():
    key = MaskedImageKey(image_shape=(1, 8, 8), dropout=0.3)
    images = torch.rand(2000, 1, 8, 8) * 2 - 1
    rows = key.drop(key.from_batch({"images": images}), torch.Generator().manual_seed(0))
    assert rows.shape == (2000, 2, 8, 8)
    null = (rows[:, 0] == 1).flatten(1).all(1) & (rows[:, 1] == 0).flatten(1).all(1)
    assert 0.25 < null.float().mean() < 0.35
    m = rows[:, :1]
    assert torch.equal(rows[:, 1:], images * (1 - m))  # known pixels only, 0 where generated


def test_the_spec_round_trips_through_json():
    again = ConditioningSpec.model_validate_json(SPEC.model_dump_json())
    assert again == SPEC and again.keys[1].channels == 2


def test_widened_conv_in_at_zero_computes_what_the_base_did():
    cfg = UNetConfig(
        in_channels=1, out_channels=1, image_size=8, base_channels=8, channel_mults=(1,),
        num_res_blocks=1, attention_resolutions=(), head_dim=8, num_classes=10, norm_groups=4,
        emb_mult=1,
    )  # fmt: skip
    torch.manual_seed(0)
    base = build_net("unet", cfg).eval()
    wide_cfg = UNetConfig.from_dict({**cfg.to_dict(), "inpaint_channels": 2})
    wide = build_net("unet", wide_cfg).eval()
    wide.load_state_dict(widen_conv_in(base.state_dict(), 2), strict=True)
    x, c = torch.randn(3, 1, 8, 8), torch.rand(3)
    labels = torch.tensor([1, 2, 10])
    cond = {"labels": labels, "inpaint": torch.randn(3, 2, 8, 8)}
    with torch.no_grad():
        torch.testing.assert_close(wide(x, c, cond), base(x, c, {"labels": labels}))
    with pytest.raises(
        InvalidArgumentError, match=r"needs cond\['inpaint'\] of shape \(3, 2, 8, 8\)"
    ):
        wide(x, c, {"labels": labels})
    with pytest.raises(InvalidArgumentError, match="inpaint_channels"):
        UNetConfig.from_dict({**cfg.to_dict(), "inpaint_channels": -1})
