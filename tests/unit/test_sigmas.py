import math

import pytest
import torch

from difforge.core import GRID_KINDS, DiscreteVP, InvalidArgumentError, get_sigmas
from difforge.core.errors import UnknownChoiceError
from difforge.samplers import get_sigmas as exported


@pytest.mark.parametrize("kind", GRID_KINDS)
@pytest.mark.parametrize("n", [1, 2, 7, 50])
def test_grid_shape_order_and_endpoints(kind, n):
    p = DiscreteVP()
    s = get_sigmas(kind, n, process=p)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[-1] == 0 and (s[:-1] > 0).all()
    assert (s[1:] < s[:-1]).all(), "strictly decreasing"
    if kind != "uniform":
        assert s[0].item() == pytest.approx(p.sigma_max)
        if n > 1 and not kind.startswith("vp_time"):  # its last level: sigma(t_max / n) or half
            assert s[-2].item() == pytest.approx(p.sigma_min)


def test_karras_rho_and_exponential_spacing():
    s = get_sigmas("exponential", 5, 0.01, 100.0)
    ratios = s[1:-1] / s[:-2]
    torch.testing.assert_close(ratios, torch.full_like(ratios, ratios[0].item()))
    k = get_sigmas("karras", 10, 0.002, 80.0, rho=7.0)
    ramp = k[:-1] ** (1 / 7)
    steps = ramp[1:] - ramp[:-1]
    torch.testing.assert_close(steps, torch.full_like(steps, steps[0].item()))


def test_uniform_leading_matches_diffusers_ddim_timesteps():
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.DDIMScheduler(beta_schedule="linear")
    sched.set_timesteps(25)
    p = DiscreteVP()
    s = get_sigmas("uniform", 25, process=p, spacing="leading")
    torch.testing.assert_close(p.sigma_to_t(s[:-1]), sched.timesteps.double(), atol=1e-6, rtol=0)


def test_exported_from_samplers_and_errors():
    assert exported is get_sigmas
    with pytest.raises(UnknownChoiceError, match="karras, exponential, uniform, vp_time"):
        get_sigmas("cosine", 10, 0.1, 10.0)
    for bad in [0, -3, 2.5, True]:
        with pytest.raises(InvalidArgumentError, match="steps"):
            get_sigmas("karras", bad, 0.1, 10.0)
    with pytest.raises(InvalidArgumentError):
        get_sigmas("karras", 10, -0.1, 10.0)
    with pytest.raises(InvalidArgumentError):
        get_sigmas("karras", 10, 0.1, math.nan)
    with pytest.raises(InvalidArgumentError, match="process"):
        get_sigmas("uniform", 10, 0.1, 10.0)
