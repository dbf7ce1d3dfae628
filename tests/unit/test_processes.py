import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difforge.core import (
    BETA_SCHEDULES,
    DiscreteVP,
    InvalidArgumentError,
    RectifiedFlow,
    UnknownChoiceError,
    VEProcess,
    make_betas,
    make_process,
    q_sample,
    snr,
)


@pytest.mark.parametrize("schedule", BETA_SCHEDULES)
def test_schedule_is_a_valid_noising_process(schedule):
    p = DiscreteVP(schedule)
    betas = make_betas(schedule, 1000)
    assert betas.shape == (1000,)
    assert (betas > 0).all() and (betas < 1).all()
    ab = p.alphas_cumprod
    assert (ab[1:] < ab[:-1]).all(), "alpha_bar must decrease"
    assert ab[0] > 0.99 and ab[-1] < 0.01, "starts near clean data, ends near pure noise"
    assert (p.sigmas[1:] > p.sigmas[:-1]).all()
    s = snr(p.sigmas)
    assert (s[1:] < s[:-1]).all(), "SNR decreases in t"
    torch.testing.assert_close(s, ab / (1 - ab))


def test_linear_schedule_endpoints_match_ddpm():
    betas = make_betas("linear", 1000, 1e-4, 0.02)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)


def test_matches_diffusers_alphas_cumprod():
    diffusers = pytest.importorskip("diffusers")
    for ours, theirs in [
        ("linear", "linear"),
        ("scaled_linear", "scaled_linear"),
        ("cosine", "squaredcos_cap_v2"),
    ]:
        ref = diffusers.DDPMScheduler(beta_schedule=theirs).alphas_cumprod.double()
        torch.testing.assert_close(DiscreteVP(ours).alphas_cumprod, ref, rtol=1e-5, atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.floats(0, 999))
def test_discrete_t_sigma_round_trip(t):
    p = DiscreteVP("cosine")
    back = p.sigma_to_t(p.t_to_sigma(torch.tensor(t, dtype=torch.float64)))
    assert back.item() == pytest.approx(t, abs=1e-6)


@settings(max_examples=50, deadline=None)
@given(st.floats(1e-3, 0.999))
def test_flow_t_sigma_round_trip_and_interpolation(t):
    p = RectifiedFlow()
    sigma = p.t_to_sigma(torch.tensor(t, dtype=torch.float64))
    assert p.sigma_to_t(sigma).item() == pytest.approx(t, rel=1e-9)
    # x_t = (1 - t) x0 + t eps equals s(sigma) (x0 + sigma eps)
    x0, eps = torch.randn(4, dtype=torch.float64), torch.randn(4, dtype=torch.float64)
    torch.testing.assert_close(q_sample(p, x0, sigma, eps), (1 - t) * x0 + t * eps)


def test_vp_q_sample_is_ddpm_forward_process():
    p = DiscreteVP()
    t = torch.tensor([10.0, 500.0, 990.0], dtype=torch.float64)
    x0 = torch.randn(3, 5, dtype=torch.float64)
    eps = torch.randn(3, 5, dtype=torch.float64)
    ab = p.alpha_bar(t)[:, None]
    expected = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(q_sample(p, x0, p.t_to_sigma(t), eps), expected)


def test_ve_identity_and_validation():
    p = VEProcess()
    s = torch.tensor([0.5, 3.0])
    assert torch.equal(p.sigma_to_t(s).float(), s)
    with pytest.raises(InvalidArgumentError):
        VEProcess(sigma_min=1.0, sigma_max=0.5)


def test_bad_schedule_lists_allowed_values():
    with pytest.raises(UnknownChoiceError, match="allowed values: linear, scaled_linear"):
        DiscreteVP("quadratic")
    with pytest.raises(UnknownChoiceError, match="vp, ve, flow"):
        make_process({"kind": "sde"})


def test_make_process_round_trip():
    for p in [DiscreteVP("sigmoid", 500), VEProcess(0.01, 50.0), RectifiedFlow(t_max=0.99)]:
        q = make_process(p.to_dict())
        assert q.to_dict() == p.to_dict()
        assert math.isclose(q.sigma_max, p.sigma_max)
