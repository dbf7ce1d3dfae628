"""One contract, every registered sampler, no per-sampler special cases."""

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, SamplingCancelled, UnknownChoiceError
from difforge.core.errors import InvalidArgumentError
from difforge.samplers import SAMPLERS, expected_nfe, get_sigmas, sample, sampler_knobs
from tests.helpers import GaussianMixture, TinyEpsNet

SHAPE = (1, 6, 6)
STEPS = 6


@pytest.fixture(scope="module")
def denoiser():
    return ModelDenoiser(TinyEpsNet(), DiscreteVP(), "eps")


def grid():
    return get_sigmas("karras", STEPS, process=DiscreteVP())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_shape_dtype_nfe_and_determinism(name, denoiser):
    a = sample(denoiser, grid(), shape=SHAPE, seeds=[1, 2, 3], sampler=name)
    b = sample(denoiser, grid(), shape=SHAPE, seeds=[1, 2, 3], sampler=name)
    assert a.x.shape == (3, *SHAPE) and a.x.dtype == torch.float32
    assert torch.isfinite(a.x).all()
    assert a.nfe == expected_nfe(name, STEPS)
    assert torch.equal(a.x, b.x), "same seeds, same samples, bitwise"
    c = sample(denoiser, grid(), shape=SHAPE, seeds=[4, 5, 6], sampler=name)
    assert not torch.equal(a.x, c.x), "other seeds, other samples"


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_batch_invariance_is_bitwise(name):
    """Sample i depends only on seed i: alone, or at any position in any batch."""
    gmm = GaussianMixture([[-2.0] * 36, [2.0] * 36], [0.5, 0.3], [0.4, 0.6])
    seeds = [11, 7, 2**40 + 3, 0]
    batch = sample(gmm, grid(), shape=SHAPE, seeds=seeds, sampler=name).x
    for i, s in enumerate(seeds):
        alone = sample(gmm, grid(), shape=SHAPE, seeds=[s], sampler=name).x
        assert torch.equal(alone[0], batch[i])
    reordered = sample(gmm, grid(), shape=SHAPE, seeds=seeds[::-1], sampler=name).x
    assert torch.equal(reordered.flip(0), batch)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_callback_sees_every_step(name, denoiser):
    seen = []
    g = grid()
    sample(denoiser, g, shape=SHAPE, seeds=[0, 1], sampler=name, callback=seen.append)
    assert [s.i for s in seen] == list(range(STEPS))
    assert [s.sigma for s in seen] == pytest.approx(g[:-1].tolist())
    assert [s.sigma_next for s in seen] == pytest.approx(g[1:].tolist())
    assert all(s.x.shape == (2, *SHAPE) and s.denoised.shape == (2, *SHAPE) for s in seen)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cancellation_from_callback(name, denoiser):
    calls = []

    def stop_at_two(info):
        calls.append(info.i)
        if info.i == 2:
            raise SamplingCancelled("client went away")

    with pytest.raises(SamplingCancelled):
        sample(denoiser, grid(), shape=SHAPE, seeds=[0], sampler=name, callback=stop_at_two)
    assert calls == [0, 1, 2]


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_cond_reaches_the_denoiser_and_guidance_uses_one_batched_call(name):
    batches = []

    def spy(x, sigma, cond=None):
        batches.append((x.shape[0], cond["labels"].tolist()))
        return x * 0.5

    labels = {"labels": torch.tensor([3, 4])}
    null = {"labels": torch.tensor([10, 10])}
    r = sample(
        spy, grid(), shape=SHAPE, seeds=[0, 1], sampler=name, cond=labels, uncond=null, guidance=2.0
    )
    assert r.nfe == len(batches) == expected_nfe(name, STEPS)
    assert all(b == (4, [3, 4, 10, 10]) for b in batches)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_arguments_raise_typed_errors(name, denoiser):
    with pytest.raises(UnknownChoiceError, match="allowed values"):
        sample(denoiser, grid(), shape=SHAPE, seeds=[0], sampler=name, not_a_knob=1)
    with pytest.raises(InvalidArgumentError, match="seeds"):
        sample(denoiser, grid(), shape=SHAPE, seeds=[-1], sampler=name)
    with pytest.raises(InvalidArgumentError, match="non-negative"):
        sample(denoiser, torch.tensor([1.0, -0.5, 0.0]), shape=SHAPE, seeds=[0], sampler=name)
    with pytest.raises(InvalidArgumentError, match="finite"):
        sample(
            denoiser,
            grid(),
            shape=SHAPE,
            seeds=[0],
            sampler=name,
            guidance=float("nan"),
            uncond={"labels": torch.tensor([10])},
        )
    for key, default in sampler_knobs(name).items():
        assert isinstance(default, int | float), f"{name}.{key} default must be a number"


def test_unknown_sampler_lists_all():
    with pytest.raises(UnknownChoiceError) as e:
        sample(lambda x, s, c=None: x, grid(), shape=SHAPE, seeds=[0], sampler="plms")
    for name in SAMPLERS:
        assert name in str(e.value)


def test_required_samplers_are_registered():
    required = {
        "ddpm",
        "ddim",
        "euler",
        "euler_ancestral",
        "heun",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "ipndm",
    }
    assert required <= set(SAMPLERS)
