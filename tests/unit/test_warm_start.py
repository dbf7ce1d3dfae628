"""`init_mode: "matching"`: a warm start from another architecture (a class U-Net into the
backbone of a text-conditioned net) loads exactly the tensors whose name and shape fit."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.nets import build_net
from difforge.pipeline import ModelConfig, NetSpec
from difforge.pipeline.artifact import save_model
from difforge.training.loop import _load_init
from tests.text_fixtures import BACKBONES, tiny_text_net


def _class_unet_folder(tmp_path):
    cfg = {k: v for k, v in BACKBONES["unet"].items() if k != "context_dim"} | {"num_classes": 3}
    torch.manual_seed(1)
    net = build_net("unet", cfg)
    return _save(tmp_path / "cls", net), net.state_dict()


def _save(folder, net):
    """A v1 model folder of `net` (8x8, VP cosine, x0)."""
    config = ModelConfig(
        name=folder.name,
        net=NetSpec(kind=net.kind, config=net.config.to_dict()),
        process={"kind": "vp", "schedule": "cosine"},
        parameterization="x0",
        image_shape=(1, 8, 8),
    )
    return save_model(folder, config, net.state_dict(), f"# {folder.name}\n")


def test_matching_loads_the_fitting_backbone_tensors_and_reports_the_rest(tmp_path):
    folder, source = _class_unet_folder(tmp_path)
    net = tiny_text_net("unet")
    before = {k: v.clone() for k, v in net.state_dict().items()}
    _, report = _load_init(net, str(folder), "matching")
    after = net.state_dict()
    loaded = [k for k in source if f"backbone.{k}" in after]
    assert "class_embed.weight" in source and "backbone.class_embed.weight" not in after
    for k in loaded:  # every shared tensor now holds the source's values
        assert torch.equal(after[f"backbone.{k}"], source[k]), k
    fresh = [k for k in after if k.removeprefix("backbone.") not in source]
    assert any(k.startswith("text.") for k in fresh)
    for k in fresh:  # text encoder, cross-attention, pooled projection: untouched
        assert torch.equal(after[k], before[k]), k
    assert report == {
        "mode": "matching",
        "loaded": len(loaded),
        "skipped": len(source) - len(loaded),
        "fresh": len(fresh),
    }
    assert report["skipped"] >= 1 and report["fresh"] >= 1


def test_exact_mode_refuses_another_architecture_and_matching_needs_one_fit(tmp_path):
    folder, _ = _class_unet_folder(tmp_path)
    with pytest.raises(InvalidArgumentError, match="do not fit"):
        _load_init(tiny_text_net("unet"), str(folder), "exact")
    with pytest.raises(InvalidArgumentError, match="no tensor"):
        _load_init(tiny_text_net("dit"), str(folder), "matching")


@pytest.mark.parametrize(
    "option", [{"query_positions": True}, {"text_layout_grid": 2}], ids=lambda o: next(iter(o))
)
def test_positional_text_paths_start_at_zero_so_a_warm_start_is_unchanged(tmp_path, option):
    """A text U-Net with query_positions or a text layout, warm-started from one without,
    computes the same output until the new weights move; moving them changes the output."""
    from tests.text_fixtures import ENCODER

    plain = tiny_text_net("unet")
    folder = _save(tmp_path / "plain", plain)
    backbone = BACKBONES["unet"] | option
    cfg = {"backbone_kind": "unet", "backbone": backbone, "encoder": ENCODER}
    net = build_net("text_conditioned", cfg)
    _, report = _load_init(net, str(folder), "matching")
    new = [k for k in net.state_dict() if "query_pos" in k or "text_layout" in k]
    assert new and report["fresh"] == len(new) and report["skipped"] == 0
    x, c = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5)
    ids = {"prompt": torch.tensor([[2, 5, 6, 0, 0, 0], [2, 7, 0, 0, 0, 0]])}
    with torch.no_grad():
        assert torch.equal(net(x, c, ids), plain(x, c, ids))
        for k in new:
            net.get_parameter(k).normal_()
        assert not torch.allclose(net(x, c, ids), plain(x, c, ids))


def test_text_layout_grid_is_checked():
    for bad in ({"text_layout_grid": 3}, {"text_layout_grid": 2, "context_dim": None}):
        with pytest.raises(InvalidArgumentError, match="text_layout_grid"):
            build_net("unet", BACKBONES["unet"] | bad)
