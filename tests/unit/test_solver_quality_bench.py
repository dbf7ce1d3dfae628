"""benchmarks/solver_quality.py's reference plumbing: one ODE per image, every start on it."""

from types import SimpleNamespace

from benchmarks.solver_quality import SIGMA_T, reference_grids, start_sigmas
from difforge.core import VEProcess


def _methods(*sigmas):
    return [SimpleNamespace(family="difforge", start_sigma=lambda s=s: s) for s in sigmas] + [
        SimpleNamespace(family="diffusers", start_sigma=lambda: SIGMA_T)
    ]


def test_start_sigmas_merge_levels_within_round_off():
    assert start_sigmas(_methods(80.0, 80.0 * (1 + 1e-9), 152.17, SIGMA_T)) == [
        80.0,
        152.17,
        SIGMA_T,
    ]


def test_reference_grids_pass_through_every_start_and_reach_zero():
    model = SimpleNamespace(process=VEProcess(0.002, 80.0))
    anchors = [80.0, 152.17, SIGMA_T]
    upper, lower = reference_grids(model, 60, anchors)
    assert upper[0].item() == SIGMA_T and upper[-1].item() == 80.0
    assert all(a in upper.tolist() for a in anchors)
    assert (upper[1:] < upper[:-1]).all() and len(upper) == 10  # 8 log steps + the 152.17 level
    ratios = (upper[:-1] / upper[1:]).tolist()
    assert min(ratios) > 1.005, "no near-zero step next to an inserted level"
    assert lower[0].item() == 80.0 and lower[-1].item() == 0 and len(lower) == 61
