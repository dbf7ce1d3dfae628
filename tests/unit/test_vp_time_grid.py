"""The vp_time grid: even in the time of the linear-beta VP SDE, trailing (no level at sigma_min),
the few-step grid of benchmarks/solver_quality.py; a typed choice of the model and the request."""

import pytest
import torch
from pydantic import ValidationError

from difforge.core import DiscreteVP, get_sigmas
from difforge.core.sigmas import (
    vp_sigma_to_time,
    vp_time_mid_sigmas,
    vp_time_sigmas,
    vp_time_to_sigma,
)
from difforge.pipeline.config import SamplingDefaults
from difforge.pipeline.request import SampleRequest


def test_time_round_trip_and_ddpm_limit():
    s = torch.logspace(-3, 2.2, 50, dtype=torch.float64)
    torch.testing.assert_close(vp_time_to_sigma(vp_sigma_to_time(s)), s, rtol=1e-10, atol=0)
    # the continuous limit of DDPM's 1000 linear betas 1e-4..0.02, sigma at t = 999 / 1000: within
    # 5% (the discrete product of (1 - beta) decays a little faster than exp(-int beta))
    ddpm = DiscreteVP("linear", 1000, 1e-4, 0.02)
    assert vp_time_to_sigma(torch.tensor(0.999, dtype=torch.float64)).item() == pytest.approx(
        ddpm.sigma_max, rel=0.05
    )


@pytest.mark.parametrize("n", [1, 4, 5, 10, 40])
def test_even_in_vp_time_and_trailing(n):
    s = vp_time_sigmas(n, 0.002, 80.0)
    assert s.dtype == torch.float64 and s.shape == (n + 1,) and s[-1] == 0
    assert s[0].item() == 80.0  # exactly, not through the round trip
    t = vp_sigma_to_time(s[:-1])
    t_max = vp_sigma_to_time(torch.tensor(80.0, dtype=torch.float64)).item()
    expected = t_max * torch.arange(n, 0, -1, dtype=torch.float64) / n
    torch.testing.assert_close(t, expected, rtol=1e-9, atol=1e-12)
    assert s[-2].item() > 0.002  # no evaluation spent at sigma_min, where D(x) ~ x
    torch.testing.assert_close(get_sigmas("vp_time", n, 0.002, 80.0), s)


@pytest.mark.parametrize("n", [1, 2, 4, 5, 10, 40])
def test_vp_time_mid_is_even_in_vp_time_down_to_half_vp_times_last_level(n):
    s = vp_time_mid_sigmas(n, 0.002, 80.0)
    assert s.dtype == torch.float64 and s.shape == (n + 1,) and s[-1] == 0
    assert s[0].item() == 80.0
    t = vp_sigma_to_time(s[:-1])
    t_max = vp_sigma_to_time(torch.tensor(80.0, dtype=torch.float64)).item()
    if n > 1:  # the last level at the midpoint of vp_time's last interval [0, t_max / n]
        assert t[-1].item() == pytest.approx(t_max / (2 * n), rel=1e-9)
        steps = t[:-1] - t[1:]
        torch.testing.assert_close(steps, steps[0].expand(n - 1), rtol=1e-8, atol=0)
    vp = vp_time_sigmas(n, 0.002, 80.0)
    assert (s[1:-1] < vp[1:-1]).all()  # every level but the first below vp_time's
    torch.testing.assert_close(get_sigmas("vp_time_mid", n, 0.002, 80.0), s)


def test_close_to_the_levels_diffusers_multistep_schedulers_visit():
    """With the DDPM schedule's range, vp_time is the continuous version of the "linspace" levels
    (timesteps linspace(0, 999, n + 1) rounded, largest first, the last dropped)."""
    ddpm = DiscreteVP("linear", 1000, 1e-4, 0.02)
    for n in (4, 6, 10):
        t = torch.linspace(0, 999, n + 1, dtype=torch.float64).round().flip(0)[:-1]
        theirs = ddpm.t_to_sigma(t)
        ours = vp_time_sigmas(n, ddpm.sigma_min, ddpm.sigma_max)[:-1]
        torch.testing.assert_close(ours, theirs, rtol=0.06, atol=0)


def test_levels_below_sigma_min_are_raised_to_it():
    s = vp_time_sigmas(8, 0.5, 80.0)
    assert s[-2].item() == 0.5 and (s[1:-1] < s[:-2]).all()


def test_a_typed_choice_of_the_model_and_the_request():
    assert SamplingDefaults(grid="vp_time").grid == "vp_time"
    assert SampleRequest(grid="vp_time").grid == "vp_time"
    assert SampleRequest(grid="vp_time_mid").grid == "vp_time_mid"
    with pytest.raises(ValidationError, match="vp_time_mid"):
        SampleRequest(grid="linear")
