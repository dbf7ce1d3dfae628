"""Properties of the few-step solvers: exact multistep weights, DEIS's time change, convergence."""

import numpy as np
import pytest
import torch

from difforge.core import get_sigmas
from difforge.core.errors import InvalidArgumentError
from difforge.samplers import sample
from difforge.samplers.multistep import TAUS, multistep_weights, vp_time
from tests.helpers import GaussianMixture

GRID = get_sigmas("karras", 8, 0.002, 80.0).tolist()  # step ratios 0.01-0.5


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_ab_weights_in_sigma_integrate_polynomials_exactly(order):
    """Variable-step Adams-Bashforth of order p integrates every polynomial of degree < p."""
    weights = multistep_weights(GRID, order, TAUS["sigma"])
    for i in range(order - 1, len(GRID) - 2):  # full-order steps not ending at 0
        a, b = GRID[i], GRID[i + 1]
        hist = [GRID[i - j] for j in range(order)]
        for deg in range(order):
            got = sum(w * h**deg for w, h in zip(weights[i], hist, strict=True))
            exact = (b ** (deg + 1) - a ** (deg + 1)) / (deg + 1)
            assert got == pytest.approx(exact, rel=1e-10, abs=1e-12), (i, deg)


def test_ab2_weights_match_comfyui_ipndm_v():
    """Order 2 is ComfyUI's ipndm_v closed form h_n ((2 + h_n/h_{n-1}) / 2, -(h_n/h_{n-1}) / 2).

    (Its order-3/4 weights are not exact for quadratics on unequal steps; difforge's are, above.)
    """
    weights = multistep_weights(GRID, 2, TAUS["sigma"])
    for i in range(1, len(GRID) - 2):
        h, h_1 = GRID[i + 1] - GRID[i], GRID[i] - GRID[i - 1]
        assert weights[i] == pytest.approx([h * (2 + h / h_1) / 2, -h * (h / h_1) / 2], rel=1e-12)


def test_vp_time_is_comfyui_edm2t():
    """sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1) hits 0.002 at t = 1e-3 and 80 at 1."""
    assert vp_time(np.array([0.002, 80.0])) == pytest.approx([1e-3, 1.0], rel=1e-12)


def test_deis_weights_match_an_integral_in_vp_time():
    """C_ij = int L_j(t) dsigma/dt dt over [t_i, t_{i+1}] (DEIS's form, as ComfyUI integrates it),
    here by a fine trapezoid rule in t: an independent route to difforge's quadrature in sigma."""
    from difforge.samplers import multistep as m

    weights = multistep_weights(GRID, 3, vp_time)
    ts = vp_time(np.array(GRID[:-1]))
    for i in range(2, len(GRID) - 2):
        tau = np.linspace(ts[i], ts[i + 1], 200001)
        g = np.exp(0.5 * m._BETA_D * tau**2 + m._BETA_MIN * tau)
        dsigma_dt = (m._BETA_D * tau + m._BETA_MIN) * g / (2 * np.sqrt(g - 1))
        hist = ts[[i, i - 1, i - 2]]
        for j in range(3):
            basis = np.prod([(tau - hist[k]) / (hist[j] - hist[k]) for k in range(3) if k != j], 0)
            f = basis * dsigma_dt
            ref = float(((f[1:] + f[:-1]) / 2 * np.diff(tau)).sum())  # trapezoid rule
            assert weights[i][j] == pytest.approx(ref, rel=1e-6, abs=1e-9), (i, j)


NEW = ["ipndm_v", "deis", "deis_logrho", "unipc", "unipc_bh1", "dpmpp_3m", "dpmpp_3m_sde"]
MULTISTEP = [*NEW, "dpmpp_2m", "dpmpp_2m_sde"]  # step-size ratios: a repeated sigma divides by 0


@pytest.mark.parametrize("name", MULTISTEP)
def test_repeated_sigma_is_a_typed_error(name):
    gmm = GaussianMixture([[0.0, 0.0]], [1.0], [1.0])
    with pytest.raises(InvalidArgumentError, match="strictly decreasing"):
        sample(gmm, torch.tensor([10.0, 1.0, 1.0, 0.0]), shape=(2,), seeds=[0], sampler=name)


@pytest.mark.parametrize(
    "name", ["ipndm_v", "deis", "deis_logrho", "unipc", "unipc_bh1", "dpmpp_3m"]
)
def test_high_order_solvers_converge_faster_than_euler(name):
    """Against a converged reference from the same noise (heun, 400 steps) on a Gaussian mixture
    with its exact denoiser: from 20 to 40 steps the error of a solver of order >= 2 shrinks by
    more than 3x (Euler's by 1.8x), and at 40 steps it is under a tenth of Euler's. (At 4-10 steps
    this toy's narrow modes rank the solvers erratically; RMSE per NFE on a real model is measured
    by benchmarks/solver_error.py.)"""
    gmm = GaussianMixture([[-2.0, 1.0], [2.0, -1.0]], [0.3, 0.6], [0.4, 0.6])

    def run(sampler, steps):
        grid = get_sigmas("karras", steps, 0.002, 80.0)
        return sample(gmm, grid, shape=(2,), seeds=range(200), sampler=sampler).x.double()

    ref = run("heun", 400)

    def err(sampler, steps):
        return (run(sampler, steps) - ref).pow(2).mean().sqrt().item()

    e20, e40 = err(name, 20), err(name, 40)
    assert e20 / e40 > 3, (e20, e40)
    assert e40 < 0.1 * err("euler", 40), e40


def test_few_step_advice_flags_heun_at_5_karras_steps_and_not_at_6():
    from difforge.samplers.advice import FewStepWarning, few_step_problem, warn_few_step

    for steps in (2, 3, 4, 5):
        assert "heun" in few_step_problem("heun", get_sigmas("karras", steps, 0.002, 80.0))
    assert few_step_problem("heun", get_sigmas("karras", 6, 0.002, 80.0)) is None
    assert few_step_problem("dpmpp_2m", get_sigmas("karras", 3, 0.002, 80.0)) is None
    with pytest.warns(FewStepWarning, match="shrinks sigma"):
        warn_few_step("heun", get_sigmas("karras", 4, 0.002, 80.0))
