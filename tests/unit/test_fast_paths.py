"""The batch-1 fast paths (issue #14, "time outside the network") change no output byte."""

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, RectifiedFlow, VEProcess, to_x0
from difforge.core.processes import append_dims
from difforge.samplers import PerSampleNoise
from tests.helpers import TinyEpsNet


@pytest.mark.parametrize("shape", [(), (1,), (15,), (16,), (3, 7, 5), (1, 28, 28)])
@pytest.mark.parametrize("batch", [1, 2, 5])
def test_noise_rows_are_bitwise_a_stack_of_per_seed_randn(shape, batch):
    seeds = [2**63 + i for i in range(batch)]
    noise = PerSampleNoise(seeds)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    for _ in range(3):  # successive draws continue each generator's stream
        ref = torch.stack([torch.randn(shape, generator=g) for g in gens])
        got = noise.draw(shape)
        assert got.shape == (batch, *shape) and got.dtype == torch.float32
        assert torch.equal(got, ref)


def test_noise_call_keeps_shape_dtype_and_device():
    like = torch.zeros(2, 3, 4, dtype=torch.float64)
    out = PerSampleNoise([1, 2])(like)
    assert out.shape == like.shape and out.dtype == torch.float64 and out.device == like.device


def uncached(den, x, sigma):
    """The adapter's uncached composition: network_output, then to_x0."""
    return to_x0(den.prediction, x, append_dims(sigma, x.ndim), den.network_output(x, sigma))


@pytest.mark.parametrize(
    ("process", "prediction"),
    [(DiscreteVP(), "eps"), (DiscreteVP("cosine"), "v"), (VEProcess(), "x0"),
     (RectifiedFlow(), "velocity")],
)  # fmt: skip
@torch.no_grad()
def test_model_denoiser_memo_is_bitwise_the_uncached_path(process, prediction):
    den = ModelDenoiser(TinyEpsNet(seed=1), process, prediction, time_scale=3.0)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for value in (0.03, 1.7, 0.03, 55.0, 1.7):  # misses, then hits
        sigma = torch.full((3,), value)
        assert torch.equal(den(x, sigma), uncached(den, x, sigma))
    mixed = torch.tensor([0.5, 2.0, 9.0])  # per-sample levels
    assert torch.equal(den(x, mixed), uncached(den, x, mixed))
    assert torch.equal(den(x, mixed.clone()), uncached(den, x, mixed))


@torch.no_grad()
def test_memo_is_not_poisoned_by_a_caller_reusing_its_sigma_tensor():
    den = ModelDenoiser(TinyEpsNet(), DiscreteVP(), "eps")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((2,), 4.0)
    den(x, sigma)
    sigma.fill_(0.5)  # in place: now a different level
    assert torch.equal(den(x, sigma), uncached(den, x, sigma))
    assert torch.equal(den(x, torch.full((2,), 4.0)), uncached(den, x, torch.full((2,), 4.0)))


def test_memo_is_bounded_and_autograd_never_uses_it():
    den = ModelDenoiser(TinyEpsNet(), DiscreteVP(), "eps")
    x = torch.randn(1, 1, 8, 8)
    with torch.no_grad():
        for i in range(1500):
            den(x, torch.full((1,), 0.01 + i * 1e-3))
    assert 0 < len(den._memo) <= 1024
    den._memo.clear()
    with torch.inference_mode():  # a server fills the memo with inference tensors ...
        den(x, torch.full((1,), 2.0))
    x_grad = x.clone().requires_grad_()
    den(x_grad, torch.full((1,), 2.0)).sum().backward()  # ... that training never touches
    den.loss_terms(x, torch.rand(1) * 10, torch.randn_like(x))
    assert len(den._memo) == 1
