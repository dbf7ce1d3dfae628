"""Parity of the few-step solvers with diffusers' UniPC and DEIS schedulers on the same eps network.

Conventions as in test_diffusers_parity.py: diffusers steps x_vp, difforge x = x_vp sqrt(1 + sigma^2);
the grid is diffusers' own (its timesteps through `sigmas_from_timesteps`, so the network sees the
same integer t). UniPC ends at sigma = 0 (`final_sigmas_type="zero"`), where both spaces coincide;
DEIS ends at sigma(t = 0) > 0, so its x_vp is compared with x / sqrt(1 + sigma_last^2). DEIS is run
at >= 15 steps, where diffusers' `lower_order_final` is off (below 15 it drops the order of the last
two steps, which difforge's deis does only on a step to sigma = 0). Tolerance: float32 round-off
(difforge computes its coefficients in float64). diffusers' third-order DEIS coefficients cancel
badly in float32 (differences of x log^2 x terms: 1.6e-3 off at 25 steps, 3e-5 when its sigmas are
float64), so DEIS is compared with diffusers' grid tensors in float64; the states stay float32.
"""

import math

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, sigmas_from_timesteps
from difforge.samplers import SAMPLERS
from tests.helpers import TinyEpsNet
from tests.parity.test_diffusers_parity import run_diffusers

diffusers = pytest.importorskip("diffusers")


@pytest.fixture(scope="module")
def setup():
    net = TinyEpsNet(seed=3)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return net, x


def ours(name, net, x_vp, sig, **knobs):
    den = ModelDenoiser(net, DiscreteVP(), "eps")
    return SAMPLERS[name](den, x_vp * math.sqrt(1 + sig[0].item() ** 2), sig, **knobs)


def diffusers_grid(sched):
    """diffusers' levels as a difforge grid: sigma at its integer timesteps, then its last level."""
    sig = sigmas_from_timesteps(DiscreteVP(), sched.timesteps.double())
    sig[-1] = sched.sigmas[-1].double()  # 0, or sigma(t = 0) for final_sigmas_type="sigma_min"
    return sig


class Float64Grid:
    """A diffusers scheduler whose sigmas (hence its step coefficients) are float64 tensors."""

    def __init__(self, sched):
        self.sched = sched

    def set_timesteps(self, steps):
        self.sched.set_timesteps(steps)
        self.sched.sigmas = self.sched.sigmas.double()

    def __getattr__(self, name):
        return getattr(self.sched, name)


def in_vp(x, sig):
    return x / math.sqrt(1 + sig[-1].item() ** 2)


# bh1 with final_sigmas_type="zero" is NaN in diffusers 0.42 (B(h) = h = -inf times a zero
# correction on the last step), so bh1 is compared on diffusers' "sigma_min" ending.
@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize(
    ("variant", "final"), [("bh2", "zero"), ("bh2", "sigma_min"), ("bh1", "sigma_min")]
)
@pytest.mark.parametrize("steps", [4, 6, 10, 20])
def test_unipc(setup, order, variant, final, steps):
    net, x = setup
    sched = diffusers.UniPCMultistepScheduler(
        beta_schedule="linear", solver_order=order, solver_type=variant, final_sigmas_type=final
    )
    ref = run_diffusers(sched, net, x, steps)
    sig = diffusers_grid(sched)
    name = "unipc" if variant == "bh2" else "unipc_bh1"
    out = in_vp(ours(name, net, x, sig, order=order), sig)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("steps", [15, 25])
def test_deis_logrho(setup, order, steps):
    net, x = setup
    sched = diffusers.DEISMultistepScheduler(beta_schedule="linear", solver_order=order)
    ref = run_diffusers(Float64Grid(sched), net, x, steps)
    sig = diffusers_grid(sched)  # ends at sigma(t = 0)
    out = in_vp(ours("deis_logrho", net, x, sig, max_order=order), sig)
    torch.testing.assert_close(out, ref, atol=5e-4, rtol=1e-4)


def test_parity_detects_the_wrong_unipc_variant(setup):
    """bh1 and bh2 differ by far more than the tolerance above, so the UniPC test is sharp."""
    net, x = setup
    sched = diffusers.UniPCMultistepScheduler(beta_schedule="linear", solver_type="bh2")
    ref = run_diffusers(sched, net, x, 6)
    assert (ours("unipc_bh1", net, x, diffusers_grid(sched)) - ref).abs().max() > 1e-2


def test_parity_detects_the_wrong_deis_time(setup):
    """tAB-DEIS (VP time) and diffusers' logrho DEIS are different solvers: the test can tell."""
    net, x = setup
    sched = diffusers.DEISMultistepScheduler(beta_schedule="linear", solver_order=3)
    ref = run_diffusers(sched, net, x, 15)
    sig = diffusers_grid(sched)
    out = in_vp(ours("deis", net, x, sig), sig)
    assert (out - ref).abs().max() > 1e-3


@pytest.mark.parametrize("steps", [15, 25])
def test_dpmpp_3m_is_dpmsolver_multistep_order_3(setup, steps):
    """diffusers' DPM-Solver++ with solver_order=3, ending at sigma(t = 0) > 0 (at >= 15 steps its
    lower_order_final is off, so every step after the warm-up is third order in both).
    solver_type="heun": the second-order warm-up step in the phi_2 form of k-diffusion's 3M; with
    diffusers' default "midpoint" that one step differs and so does every image (by up to 3.2)."""
    net, x = setup
    sched = diffusers.DPMSolverMultistepScheduler(
        beta_schedule="linear", solver_order=3, solver_type="heun", final_sigmas_type="sigma_min"
    )
    ref = run_diffusers(Float64Grid(sched), net, x, steps)
    sig = diffusers_grid(sched)
    torch.testing.assert_close(in_vp(ours("dpmpp_3m", net, x, sig), sig), ref, atol=5e-4, rtol=1e-4)
