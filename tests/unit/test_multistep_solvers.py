"""Properties of the few-step solvers: exact multistep weights, DEIS's time change, convergence."""

import math

import numpy as np
import pytest
import torch

from difforge.core import get_sigmas
from difforge.core.errors import InvalidArgumentError
from difforge.samplers import SAMPLERS, PerSampleNoise, sample
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


ORDERS = [  # measured slopes at 16 -> 32 -> 64 steps in the comment
    ("ipndm_v", {}, 3),  # 3.43 3.44 (4th-order weights; the Euler first step caps it near 3)
    ("ipndm_v", {"max_order": 2}, 2),  # 1.93 1.96
    ("deis", {}, 3),  # 2.71 2.85
    ("deis_logrho", {}, 3),  # 3.01 3.01
    ("unipc", {}, 3),  # 3.22 3.09 (UniP-2 + UniC: one order up, Zhao et al. 2023 Thm. 3.3)
    ("unipc_bh1", {}, 3),  # 3.33 3.13
    ("unipc", {"order": 3}, 4),  # 4.93 4.21
    ("dpmpp_3m", {}, 2),  # 2.52 1.57: the same numbers as k-diffusion's and diffusers' 3M
]


@pytest.mark.parametrize(("name", "knobs", "order"), ORDERS, ids=str)
def test_convergence_order_on_the_exact_mixture_denoiser(name, knobs, order):
    """The harness of test_convergence_order.py (RMSE against Heun-2048 from the same noise on
    Karras grids 0.05..10), at 16, 32, 64 steps: beyond, the third-order errors reach the
    reference's own (~1e-6). Each slope must lie in [p - 0.45, p + 1]."""
    from tests.unit.test_convergence_order import HI, LO, MIX

    x_init = PerSampleNoise(range(16)).draw((2,)).double() * HI
    ref = SAMPLERS["heun"](MIX, x_init, get_sigmas("karras", 2048, LO, HI))
    steps = (16, 32, 64)
    e = [
        (SAMPLERS[name](MIX, x_init, get_sigmas("karras", n, LO, HI), **knobs) - ref)
        .pow(2).mean().sqrt().item()
        for n in steps
    ]  # fmt: skip
    slopes = [math.log(e[i] / e[i + 1]) / math.log(2) for i in range(2)]
    assert all(order - 0.45 <= v <= order + 1 for v in slopes), (name, knobs, e, slopes)


def test_few_step_advice_flags_heun_at_5_karras_steps_and_not_at_6():
    from difforge.samplers.advice import FewStepWarning, few_step_problem, warn_few_step

    for steps in (2, 3, 4, 5):
        assert "heun" in few_step_problem("heun", get_sigmas("karras", steps, 0.002, 80.0))
    assert few_step_problem("heun", get_sigmas("karras", 6, 0.002, 80.0)) is None
    assert few_step_problem("dpmpp_2m", get_sigmas("karras", 3, 0.002, 80.0)) is None
    with pytest.warns(FewStepWarning, match="shrinks sigma"):
        warn_few_step("heun", get_sigmas("karras", 4, 0.002, 80.0))
