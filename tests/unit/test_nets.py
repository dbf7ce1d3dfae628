"""difforge.nets: U-Net shapes, conditioning, gradients, config round trips, weights, counters."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from difforge.core.denoiser import EDMPrecond
from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.nets import (
    MNIST_UNET,
    NET_KINDS,
    UNet,
    UNetConfig,
    build_net,
    count_parameters,
    flops_per_forward,
    net_config_from_dict,
)
from difforge.nets.layers import sinusoidal_embedding

TINY = UNetConfig(
    in_channels=1,
    out_channels=1,
    image_size=8,
    base_channels=8,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    num_classes=3,
    norm_groups=4,
)


pytestmark = pytest.mark.usefixtures("one_thread")


def make(config: UNetConfig = TINY, seed: int = 0) -> UNet:
    """A net in eval mode whose zero-initialised layers are perturbed, so every path matters."""
    torch.manual_seed(seed)
    net = UNet(config).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def inputs(config: UNetConfig = TINY, batch: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config.in_channels, config.image_size, config.image_size, generator=g)
    return x, torch.rand(batch, generator=g) * 1000


@pytest.mark.parametrize(
    "config",
    [
        TINY,
        dataclasses.replace(TINY, in_channels=3, out_channels=6, num_classes=0),
        dataclasses.replace(
            TINY,
            image_size=16,
            channel_mults=(1, 2, 2),
            attention_resolutions=(8, 4),
            num_res_blocks=2,
        ),
        dataclasses.replace(TINY, num_res_blocks=0, attention_resolutions=(), context_dim=5),
        dataclasses.replace(TINY, image_size=6, channel_mults=(1, 1), attention_resolutions=(3,)),
    ],
    ids=["tiny", "rgb-uncond", "three-levels", "no-res-blocks", "odd-bottom"],
)
def test_output_shape(config):
    net = make(config)
    x, t = inputs(config)
    out = net(x, t, None)
    assert out.shape == (3, config.out_channels, config.image_size, config.image_size)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_fresh_net_outputs_zero():
    x, t = inputs()
    assert torch.equal(UNet(TINY)(x, t, None), torch.zeros_like(x))


def test_output_depends_on_labels_and_noise_level():
    net = make()
    x, t = inputs()
    a = net(x, t, {"labels": torch.tensor([0, 1, 2])})
    b = net(x, t, {"labels": torch.tensor([1, 2, 0])})
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-4
    c = net(x, t + 1.0, {"labels": torch.tensor([0, 1, 2])})
    assert (a - c).abs().amax() > 1e-5


def test_missing_labels_mean_the_null_class():
    net = make()
    x, t = inputs()
    null = net(x, t, {"labels": torch.full((3,), TINY.num_classes)})
    assert torch.equal(net(x, t, None), null)
    assert torch.equal(net(x, t, {}), null)


def test_unconditional_net_ignores_labels():
    config = dataclasses.replace(TINY, num_classes=0)
    net = make(config)
    x, t = inputs(config)
    assert torch.equal(net(x, t, None), net(x, t, {"labels": torch.tensor([0, 1, 2])}))


@pytest.mark.parametrize(
    "c_noise",
    [
        torch.tensor([0.0, 500.0, 999.0]),
        torch.tensor([-1.6, 0.0, 1.1]),
        torch.tensor([0.0, 0.5, 1.0]),
    ],
    ids=["ddpm-timesteps", "edm-log-sigma", "flow-t"],
)
def test_noise_embedding_separates_every_input_range(c_noise):
    emb = sinusoidal_embedding(c_noise, 64)
    assert emb.shape == (3, 64) and torch.isfinite(emb).all()
    gaps = torch.cdist(emb, emb)[~torch.eye(3, dtype=torch.bool)]
    assert gaps.min() > 0.1
    net = make()
    x, _ = inputs()
    out = net(x[:1].expand(3, -1, -1, -1), c_noise, None)
    assert (out[0] - out[1]).abs().amax() > 1e-5 and (out[1] - out[2]).abs().amax() > 1e-5


def test_scalar_c_noise_broadcasts():
    net = make()
    x, _ = inputs()
    assert torch.equal(net(x, torch.tensor(3.0), None), net(x, torch.full((3,), 3.0), None))


def test_gradients_reach_every_parameter():
    config = dataclasses.replace(TINY, context_dim=4)
    net = make(config).train()
    x, t = inputs(config)
    cond = {"labels": torch.tensor([0, 1, 2, 3]), "context": torch.randn(4, 5, 4)}
    cond["pooled"] = torch.randn(4, 4)  # the pooled text vector (context_dim wide)
    x, t = torch.cat([x, x[:1]]), torch.cat([t, t[:1]])
    net(x, t, cond).square().mean().backward()
    dead = [n for n, p in net.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


def test_cross_attention_depends_on_context():
    config = dataclasses.replace(TINY, context_dim=6)
    net = make(config)
    x, t = inputs(config)
    g = torch.Generator().manual_seed(2)
    ctx = torch.randn(3, 5, 6, generator=g)
    a = net(x, t, {"context": ctx})
    b = net(x, t, {"context": ctx + torch.randn(3, 5, 6, generator=g)})
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-5
    assert (a - net(x, t, None)).abs().amax() > 1e-5
    short = net(x, t, {"context": ctx[:, :2]})  # any context length works
    assert short.shape == a.shape
    with pytest.raises(InvalidArgumentError, match="context"):
        net(x, t, {"context": torch.randn(3, 5, 7)})


def test_bad_labels_and_c_noise_are_refused():
    net = make()
    x, t = inputs()
    with pytest.raises(InvalidArgumentError, match=r"\[0, 3\]"):
        net(x, t, {"labels": torch.tensor([0, 1, 4])})
    with pytest.raises(InvalidArgumentError, match="labels"):
        net(x, t, {"labels": torch.tensor([0.0, 1.0, 2.0])})
    with pytest.raises(InvalidArgumentError, match="c_noise"):
        net(x, t[:2], None)


def test_config_json_round_trip():
    for config in (TINY, MNIST_UNET, dataclasses.replace(TINY, context_dim=16, dropout=0.1)):
        d = json.loads(json.dumps(config.to_dict()))
        assert UNetConfig.from_dict(d) == config
        assert net_config_from_dict("unet", d) == config
        assert build_net("unet", d).config == config


def test_lists_are_stored_as_tuples():
    config = dataclasses.replace(TINY, channel_mults=[1, 2], attention_resolutions=[4])
    assert config == TINY and hash(config) == hash(TINY)


def test_from_dict_refuses_unknown_keys_and_lists_them():
    d = TINY.to_dict() | {"chanels": 3, "attn": 1}
    with pytest.raises(InvalidArgumentError, match=r"\['attn', 'chanels'\]"):
        UNetConfig.from_dict(d)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image_size": 9}, "divisible"),
        ({"attention_resolutions": (2,)}, "not feature-map sizes"),
        ({"head_dim": 6}, "head_dim"),
        ({"norm_groups": 3}, "norm_groups"),
        ({"dropout": 1.0}, "dropout"),
        ({"num_classes": -1}, "num_classes"),
        ({"channel_mults": ()}, "channel_mults"),
        ({"channel_mults": (1, 0)}, "channel_mults"),
        ({"base_channels": 0}, "base_channels"),
        ({"in_channels": True}, "in_channels"),
        ({"num_res_blocks": 1.5}, "num_res_blocks"),
        ({"context_dim": 0}, "context_dim"),
        ({"attention_resolutions": (4.0,)}, "attention_resolutions"),
    ],
)
def test_invalid_configs_raise(change, message):
    with pytest.raises(InvalidArgumentError, match=message):
        dataclasses.replace(TINY, **change)


def test_build_net_unknown_kind_lists_allowed():
    with pytest.raises(UnknownChoiceError, match="unet"):
        build_net("transformer", {})
    assert "unet" in NET_KINDS


def test_safetensors_round_trip_is_bitwise(tmp_path):
    config = dataclasses.replace(TINY, context_dim=4)
    net = make(config, seed=3)
    path = tmp_path / "model.safetensors"
    save_file(net.state_dict(), str(path))
    again = build_net("unet", json.loads(json.dumps(config.to_dict()))).eval()
    again.load_state_dict(load_file(str(path)), strict=True)
    x, t = inputs(config)
    cond = {"labels": torch.tensor([0, 3, 1]), "context": torch.randn(3, 2, 4)}
    assert torch.equal(net(x, t, cond), again(x, t, cond))


def test_parameter_and_flop_counts_are_plausible():
    net = UNet(MNIST_UNET)
    n = count_parameters(net)
    assert n == sum(p.numel() for p in net.parameters()) and 5e5 < n < 1e7
    x, t = inputs(MNIST_UNET, batch=1)
    one = flops_per_forward(net, x, t)
    assert 1e8 < one < 1e10  # a small U-Net on 28x28: between 0.1 and 10 GFLOP per image
    assert flops_per_forward(net, x.expand(2, -1, -1, -1), t.expand(2)) == 2 * one
    no_attn = UNet(dataclasses.replace(MNIST_UNET, attention_resolutions=()))
    # attention adds its projections and the QK^T, PV matmuls (counted by our CPU formula)
    assert flops_per_forward(net, x, t) > flops_per_forward(no_attn, x, t)
    for p in net.parameters():
        p.requires_grad_(False)
    assert count_parameters(net, trainable_only=True) == 0


def test_runs_under_edm_preconditioning_and_bfloat16():
    net = make().to(torch.bfloat16)
    x, _ = inputs()
    sigma = torch.tensor([0.01, 1.0, 80.0])
    out = EDMPrecond(net)(x, sigma, {"labels": torch.tensor([0, 1, 3])})
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
