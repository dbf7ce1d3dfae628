"""The KL autoencoder net: shapes, config checks, KL and reconstruction terms."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.nets import AutoencoderConfig, build_net
from difforge.nets.autoencoder import kl_divergence, reconstruction_loss

TINY = AutoencoderConfig(image_size=16, latent_channels=3, base_channels=8, channel_mults=(1, 2, 2), norm_groups=4)  # fmt: skip


def test_encode_decode_shapes_follow_the_factor():
    net = build_net("autoencoder", TINY.to_dict())
    x = torch.randn(2, 1, 16, 16)
    mean, logvar = net.encode(x)
    assert TINY.factor == 4 and mean.shape == logvar.shape == (2, *TINY.latent_shape) == (
        2,
        3,
        4,
        4,
    )
    assert net.decode(mean).shape == x.shape and net(x).shape == x.shape


def test_config_round_trips_and_refuses_bad_values():
    assert AutoencoderConfig.from_dict(TINY.to_dict()) == TINY
    with pytest.raises(InvalidArgumentError, match="divisible"):
        AutoencoderConfig(image_size=18, channel_mults=(1, 2, 2))
    with pytest.raises(InvalidArgumentError, match="unknown AutoencoderConfig keys"):
        AutoencoderConfig.from_dict({"colour": 1})


def test_kl_is_zero_at_the_prior_and_positive_elsewhere():
    zero = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(kl_divergence(zero, zero), torch.zeros(2))
    assert (kl_divergence(zero + 1, zero) > 0).all() and (kl_divergence(zero, zero - 1) > 0).all()
    x = torch.rand(2, 1, 4, 4)
    assert torch.equal(reconstruction_loss(x, x), torch.zeros(2))
    assert torch.allclose(reconstruction_loss(x, x + 0.5, "l2"), torch.full((2,), 0.25))
