"""Grid edge cases and the last-step choices that the samplers' docstrings document."""

import math

import pytest
import torch

from difforge.core import DiscreteVP, InvalidArgumentError, get_sigmas
from difforge.core.sigmas import SPACINGS
from difforge.samplers import SAMPLERS, PerSampleNoise, sample, sample_ipndm
from difforge.samplers.ipndm import _AB
from tests.helpers import GaussianMixture

GMM = GaussianMixture([[-2.0] * 4, [1.5] * 4], [0.5, 0.3], [0.4, 0.6])


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize(
    "bad", [[10.0, 1.0, 1.0, 0.0], [10.0, 1.0, 0.0, 0.0], [5.0, 5.0], [3.0, 1.0, 2.0, 0.0]]
)
def test_repeated_or_rising_sigma_is_a_typed_error(name, bad):
    """A repeated sigma used to raise a bare ZeroDivisionError in dpmpp_2m / dpmpp_2m_sde
    (r = h_last / h with h = 0) and in euler on a 0 -> 0 step; now every sampler rejects it."""
    with pytest.raises(InvalidArgumentError, match="strictly decreasing"):
        sample(GMM, torch.tensor(bad), shape=(4,), seeds=[0], sampler=name)


@pytest.mark.parametrize("spacing", SPACINGS)
@pytest.mark.parametrize("n", [999, 1000])
def test_uniform_grids_never_repeat_a_sigma(spacing, n):
    s = get_sigmas("uniform", n, process=DiscreteVP(), spacing=spacing)
    assert (s[1:] < s[:-1]).all()


@pytest.mark.parametrize("n", [2, 10, 200])
def test_exponential_grid_is_float64_accurate(n):
    """Computed through a float64 linspace: endpoints and log-spacing exact to ~1e-15
    (the old float32 linspace was off by ~1e-7, which this test catches)."""
    s = get_sigmas("exponential", n, 0.002, 80.0)
    assert s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80.0, rel=1e-14)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-14)
    logs = s[:-1].log()
    step = (math.log(0.002) - math.log(80.0)) / (n - 1)
    torch.testing.assert_close(
        logs[1:] - logs[:-1], torch.full((n - 1,), step, dtype=torch.float64), atol=1e-13, rtol=0
    )


def test_ipndm_last_step_to_zero_is_x0_hat_and_other_steps_are_adams_bashforth():
    """Documented choice (sample_ipndm's docstring, as ComfyUI): the step to sigma = 0 returns
    x0_hat; a grid that stops above 0 takes the 4th-order update on its last step too."""
    sig = get_sigmas("karras", 5, 0.05, 20.0)
    x = PerSampleNoise([1, 2]).draw((4,)).double() * sig[0].item()  # (2, 4)
    states, denoised = [x], []

    def record(info):
        states.append(info.x)
        denoised.append(info.denoised)

    assert torch.equal(sample_ipndm(GMM, x, sig, callback=record), denoised[-1])
    states, denoised = [x], []
    out = sample_ipndm(GMM, x, sig[:-1], callback=record)  # 4 steps, ending at 0.05
    s = sig.tolist()
    d = [(xi - di) / si for xi, di, si in zip(states[:-1], denoised, s[:-2], strict=True)]
    d_ab = sum(w * dj for w, dj in zip(_AB[3], d[::-1], strict=True))  # newest first
    torch.testing.assert_close(out, states[-2] + d_ab * (s[-2] - s[-3]), atol=1e-12, rtol=0)
