"""The 1-D U-Net: shapes, conditioning, the learned null class, config checks, the registry."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError, UnknownChoiceError
from difforge.nets import NET_KINDS, UNet1D, UNet1DConfig, build_net, count_parameters
from difforge.nets.layers import AttentionBlock

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = {
    "in_channels": 2,
    "out_channels": 2,
    "length": 32,
    "base_channels": 16,
    "channel_mults": [1, 2, 2],
    "num_res_blocks": 1,
    "attention_resolutions": [8],
    "head_dim": 16,
    "norm_groups": 4,
    "num_classes": 3,
}


def _randomised(net: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every weight: zero-initialised output layers would hide conditioning effects."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


def test_registered_and_shapes():
    assert "unet1d" in NET_KINDS
    net = build_net("unet1d", SMALL)
    assert isinstance(net, UNet1D) and net.kind == "unet1d"
    assert net.config == UNet1DConfig.from_dict(net.config.to_dict())
    x = torch.randn(5, 2, 32)
    out = net(x, torch.rand(5), {"labels": torch.tensor([0, 1, 2, 3, 0])})
    assert out.shape == (5, 2, 32) and out.dtype == torch.float32
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert not convs, "a 1-D net must not hold 2-D convolutions"
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    assert attn, "attention over time at length 8 (and in the middle) was requested"


def test_zero_init_output_then_labels_and_noise_matter():
    net = build_net("unet1d", SMALL)
    x = torch.randn(2, 2, 32)
    assert torch.count_nonzero(net(x, torch.zeros(2))) == 0  # conv_out starts at zero (ADM)
    net = _randomised(net)
    c = torch.full((2,), 0.3)
    a = net(x, c, {"labels": torch.tensor([0, 0])})
    b = net(x, c, {"labels": torch.tensor([1, 1])})
    assert (a - b).abs().max() > 1e-4
    assert (net(x, c + 1.0, {"labels": torch.tensor([0, 0])}) - a).abs().max() > 1e-4


def test_missing_labels_mean_the_null_class():
    net = _randomised(build_net("unet1d", SMALL))
    x, c = torch.randn(3, 2, 32), torch.rand(3)
    null = net(x, c, {"labels": torch.full((3,), 3)})
    torch.testing.assert_close(net(x, c, None), null)
    torch.testing.assert_close(net(x, c, {}), null)
    with pytest.raises(InvalidArgumentError, match=r"\[0, 3\]"):
        net(x, c, {"labels": torch.tensor([0, 1, 4])})


def test_each_series_independent_of_its_batch():
    net = _randomised(build_net("unet1d", SMALL))
    x, c = torch.randn(4, 2, 32), torch.rand(4)
    labels = torch.tensor([0, 1, 2, 3])
    full = net(x, c, {"labels": labels})
    one = net(x[2:3], c[2:3], {"labels": labels[2:3]})
    torch.testing.assert_close(full[2:3], one, atol=1e-5, rtol=1e-5)


def test_config_errors_name_the_field():
    with pytest.raises(InvalidArgumentError, match="length 30 is not divisible by 4"):
        UNet1DConfig(length=30)
    with pytest.raises(InvalidArgumentError, match=r"attention_resolutions \[16\]"):
        UNet1DConfig(length=128, attention_resolutions=(16,), channel_mults=(1, 2))
    with pytest.raises(InvalidArgumentError, match="unknown UNet1DConfig keys"):
        build_net("unet1d", {"image_size": 32})
    with pytest.raises(UnknownChoiceError, match="unet1d"):
        build_net("unet3d", {})


def test_unet1d_is_cheaper_than_a_2d_net_of_the_same_width():
    net1 = build_net("unet1d", {"length": 32, "base_channels": 16, "attention_resolutions": [8]})
    net2 = build_net(
        "unet",
        {
            "image_size": 32,
            "base_channels": 16,
            "num_res_blocks": 1,
            "attention_resolutions": [8],
            "norm_groups": 8,
        },
    )
    # 3-tap kernels instead of 3x3 ones: far fewer weights for the same layout
    assert count_parameters(net1) < 0.5 * count_parameters(net2)
