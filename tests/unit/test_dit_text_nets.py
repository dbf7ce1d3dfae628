"""DiT and the text-conditioned net: contract shapes, adaLN-Zero identity at init, padding masks,
prompt dependence and gradients that reach the text encoder (joint training)."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.nets import DiT, DiTConfig, build_net, net_config_from_dict
from tests.text_fixtures import BACKBONES, tiny_text_net, tiny_text_spec

torch.set_num_threads(1)


def _perturbed(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return net


def test_dit_starts_as_zero_output_with_zero_modulation():
    torch.manual_seed(0)
    net = DiT(DiTConfig(image_size=8, patch_size=2, width=16, depth=2, heads=2, num_classes=3))
    out = net(torch.randn(2, 1, 8, 8), torch.rand(2), {"labels": torch.tensor([0, 3])})
    assert out.shape == (2, 1, 8, 8) and torch.count_nonzero(out) == 0
    for block in net.blocks:
        assert (
            torch.count_nonzero(block.ada.weight) == 0 and torch.count_nonzero(block.ada.bias) == 0
        )


def test_dit_config_round_trips_and_refuses_bad_shapes():
    cfg = net_config_from_dict("dit", {"image_size": 8, "patch_size": 4, "width": 16, "heads": 2})
    assert DiTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(InvalidArgumentError, match="does not divide image_size"):
        DiTConfig(image_size=10, patch_size=4)
    with pytest.raises(InvalidArgumentError, match="unknown DiTConfig keys"):
        net_config_from_dict("dit", {"patch": 2})


def test_unpatchify_inverts_patchify_layout():
    net = DiT(DiTConfig(image_size=8, patch_size=2, width=16, heads=2, depth=1))
    x = torch.randn(1, 1, 8, 8)
    patches = (
        x.reshape(1, 1, 4, 2, 4, 2).permute(0, 2, 4, 3, 5, 1).reshape(1, 16, 4)
    )  # (B, T, p*p*C)
    assert torch.equal(net._unpatchify(patches), x)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_masked_context_tokens_do_not_change_the_output(kind):
    torch.manual_seed(0)
    net = _perturbed(build_net(kind, BACKBONES[kind])).eval()
    x, c = torch.randn(2, 1, 8, 8), torch.rand(2)
    ctx = torch.randn(2, 5, 16)
    mask = torch.tensor([[True, True, False, False, False], [True, False, False, False, False]])
    other = torch.where(mask[..., None], ctx, torch.randn(2, 5, 16))
    a = net(x, c, {"context": ctx, "context_mask": mask, "pooled": ctx[:, 0]})
    b = net(x, c, {"context": other, "context_mask": mask, "pooled": ctx[:, 0]})
    assert torch.allclose(a, b, atol=1e-6)
    unmasked = net(x, c, {"context": other, "pooled": ctx[:, 0]})
    assert not torch.allclose(a, unmasked, atol=1e-4)


@pytest.mark.parametrize("kind", ["unet", "dit"])
def test_text_net_depends_on_the_prompt_and_is_batch_invariant(kind):
    net = tiny_text_net(kind).eval()
    key = tiny_text_spec().keys[0]
    ids = torch.stack(key.resolve(["a thick 7", "the digit three"], 2))  # (2, L)
    x, c = torch.randn(1, 1, 8, 8).expand(2, -1, -1, -1), torch.full((2,), 0.3)
    out = net(x, c, {"prompt": ids})
    assert not torch.allclose(out[0], out[1], atol=1e-4)
    alone = net(x[:1], c[:1], {"prompt": ids[1:]})
    assert torch.allclose(out[1:], alone, atol=1e-5)
    null = net(x[:1], c[:1], None)  # no prompt = the null prompt
    assert torch.allclose(null, net(x[:1], c[:1], {"prompt": key.null_row()[None]}), atol=1e-6)


def test_gradients_reach_the_text_encoder():
    net = tiny_text_net("dit").train()
    ids = torch.stack(tiny_text_spec().keys[0].resolve("a thick 7", 1))
    net(torch.randn(1, 1, 8, 8), torch.rand(1), {"prompt": ids}).square().mean().backward()
    assert net.text.embed.weight.grad[ids[0]].abs().sum() > 0
    assert net.text.blocks[0].qkv.weight.grad.abs().sum() > 0


def test_text_net_refuses_mismatched_widths_and_bad_ids():
    bb = dict(BACKBONES["dit"], context_dim=32)
    with pytest.raises(InvalidArgumentError, match="context_dim 32 must equal encoder width 16"):
        build_net(
            "text_conditioned", {"backbone_kind": "dit", "backbone": bb, "encoder": {"width": 16}}
        )
    net = tiny_text_net("unet")
    with pytest.raises(InvalidArgumentError, match="token ids must lie in"):
        net(torch.randn(1, 1, 8, 8), torch.rand(1), {"prompt": torch.full((1, 6), 99)})
