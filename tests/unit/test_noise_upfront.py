"""noise.upfront: a call's per-sample draws made together before the loop are bitwise the draws
made one per step, and other sources are left alone."""

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, get_sigmas
from difforge.samplers import noise as noise_mod
from difforge.samplers import sample
from difforge.samplers.noise import GeneratorNoise, PerSampleNoise, upfront
from tests.helpers import TinyEpsNet


def test_upfront_draws_are_the_per_step_draws_in_order():
    like = torch.zeros(3, 1, 6, 6)
    lazy = PerSampleNoise([5, 6, 7])
    want = [lazy(like) for _ in range(4)]
    got = upfront(PerSampleNoise([5, 6, 7]), like, 4)
    assert not isinstance(got, PerSampleNoise)  # drawn up front
    assert all(torch.equal(got(like), w) for w in want)


def test_other_sources_single_draws_and_large_calls_are_left_alone(monkeypatch):
    like = torch.zeros(1, 1, 6, 6)
    other = GeneratorNoise(torch.Generator().manual_seed(0))
    assert upfront(other, like, 5) is other
    own = PerSampleNoise([1])
    assert upfront(own, like, 1) is own
    monkeypatch.setattr(noise_mod, "UPFRONT_LIMIT", 4 * 36 - 1)
    assert upfront(own, like, 4) is own


@pytest.mark.parametrize(
    ("sampler", "knobs"),
    [("euler_ancestral", {}), ("ddim", {"eta": 0.5}), ("dpmpp_2m_sde", {}), ("dpmpp_3m_sde", {})],
)
def test_stochastic_samplers_give_the_same_bytes_with_draws_up_front_or_per_step(
    monkeypatch, sampler, knobs
):
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 7, process=process)
    kw = dict(shape=(1, 6, 6), seeds=[3, 1, 4], sampler=sampler, **knobs)
    ahead = sample(ModelDenoiser(TinyEpsNet(), process, "eps"), sigmas, **kw)
    monkeypatch.setattr(noise_mod, "UPFRONT_LIMIT", 0)  # every draw per step
    per_step = sample(ModelDenoiser(TinyEpsNet(), process, "eps"), sigmas, **kw)
    assert torch.equal(ahead.x, per_step.x)


@pytest.mark.parametrize(
    ("seeds", "shape"),
    [
        ([5], (1, 28, 28)),
        ([5, 6, 7], (1, 4, 4)),
        ([2], (3, 5, 5)),
        ([2, 9], (1, 3, 3)),
        ([4], (8,)),
    ],
)
def test_a_run_of_draws_is_bitwise_the_draws_one_after_another(seeds, shape):
    """draw_run's one normal_ per sample (sizes that are multiples of 16) or its fallback (others:
    75, 9 and 8 values) gives the bytes of successive draws, and the next draw after the run is
    the next draw after them: the generators are left where one-by-one draws leave them."""
    lazy, run = PerSampleNoise(seeds), PerSampleNoise(seeds)
    want = [lazy.draw(shape) for _ in range(5)]
    got = run.draw_run(shape, 5)
    assert all(g.is_contiguous() and g.shape == (len(seeds), *shape) for g in got)
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))
    assert torch.equal(run.draw(shape), lazy.draw(shape))
