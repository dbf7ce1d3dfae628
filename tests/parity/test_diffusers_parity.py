"""Parity with diffusers' schedulers driving the same eps network.

Conventions: diffusers works in VP space (x_vp), difforge in VE space (x = x_vp / sqrt(alpha_bar)),
so the initial noise is scaled by sqrt(1 + sigma_max^2) for DDIM / DPM-Solver and by sigma_max for
Euler (whose `init_noise_sigma` already does that); at sigma = 0 both spaces coincide. Grids:
DDIM's "leading" timesteps = get_sigmas("uniform", spacing="leading"); Euler's "linspace" =
spacing="linspace"; DPMSolverMultistep's timesteps are passed through `sigmas_from_timesteps`.
DPM-Solver's `lower_order_final` (first order on the last step, used below 15 steps) is what
difforge's 2M does on the step to sigma = 0. Tolerance: float32 round-off over the loop.
"""

import math

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, get_sigmas, sigmas_from_timesteps
from difforge.samplers import sample_ddim, sample_dpmpp_2m, sample_euler
from tests.helpers import TinyEpsNet

diffusers = pytest.importorskip("diffusers")


def run_diffusers(sched, net, x, steps):
    sched.set_timesteps(steps)
    x = x * sched.init_noise_sigma
    for t in sched.timesteps:
        eps = net(sched.scale_model_input(x, t), t.float().expand(x.shape[0]))
        x = sched.step(eps, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def setup():
    net = TinyEpsNet(seed=3)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(5))
    return net, x


@pytest.mark.parametrize("schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("steps", [5, 10, 25])
def test_ddim(setup, schedule, steps):
    net, x = setup
    proc = DiscreteVP(
        schedule,
        beta_start=1e-4 if schedule == "linear" else 8.5e-4,
        beta_end=0.02 if schedule == "linear" else 0.012,
    )
    sched = diffusers.DDIMScheduler(
        beta_schedule=schedule,
        beta_start=proc.beta_start,
        beta_end=proc.beta_end,
        clip_sample=False,
    )
    ref = run_diffusers(sched, net, x, steps)
    sig = get_sigmas("uniform", steps, process=proc, spacing="leading")
    ours = sample_ddim(ModelDenoiser(net, proc, "eps"), x * math.sqrt(1 + sig[0].item() ** 2), sig)
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [5, 10, 20])
def test_dpmsolver_multistep_2m(setup, steps):
    net, x = setup
    proc = DiscreteVP()
    sched = diffusers.DPMSolverMultistepScheduler(beta_schedule="linear", solver_order=2)
    ref = run_diffusers(sched, net, x, steps)
    sig = sigmas_from_timesteps(proc, sched.timesteps.double())
    ours = sample_dpmpp_2m(
        ModelDenoiser(net, proc, "eps"), x * math.sqrt(1 + sig[0].item() ** 2), sig
    )
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [5, 10, 30])
def test_euler_discrete(setup, steps):
    net, x = setup
    proc = DiscreteVP()
    sched = diffusers.EulerDiscreteScheduler(beta_schedule="linear")
    ref = run_diffusers(sched, net, x, steps)
    sig = get_sigmas("uniform", steps, process=proc, spacing="linspace")
    ours = sample_euler(ModelDenoiser(net, proc, "eps"), x * sig[0].item(), sig)
    torch.testing.assert_close(ours, ref, atol=5e-4, rtol=1e-4)


def test_parity_detects_a_wrong_grid(setup):
    """The DDIM comparison is sharp enough to see an off-by-one grid ("trailing" vs "leading")."""
    net, x = setup
    proc = DiscreteVP()
    ref = run_diffusers(
        diffusers.DDIMScheduler(beta_schedule="linear", clip_sample=False), net, x, 10
    )
    sig = get_sigmas("uniform", 10, process=proc, spacing="trailing")
    ours = sample_ddim(ModelDenoiser(net, proc, "eps"), x * math.sqrt(1 + sig[0].item() ** 2), sig)
    assert (ours - ref).abs().max() > 1e-2
