"""Known failure regions of samplers, so few-step sweeps can warn or leave a method out.

Heun (and DPM-2, if registered) evaluate a corrector at the next level of the grid. On the Karras
grid (rho = 7, sigma 0.002-80) at <= 5 steps a step shrinks sigma 85-1300x, so the corrector's
derivative is taken where the predictor's error is of the order of the signal: every
implementation gives FIDs in the thousands there (issue #14). At 6 steps the worst ratio is 43x.
"""

from __future__ import annotations

import itertools
import warnings

from torch import Tensor

from difforge.samplers.base import sigma_list

CORRECTOR_AT_NEXT_SIGMA = frozenset({"heun", "dpm_2"})
MAX_STEP_RATIO = 50.0  # sigma_i / sigma_{i+1} above which such a corrector is not trusted


class FewStepWarning(UserWarning):
    """A sampler is run on a grid where it is known to fail."""


def few_step_problem(sampler: str, sigmas: Tensor | list[float]) -> str | None:
    """Why `sampler` should not be run on `sigmas`, or None when nothing is known against it."""
    if sampler not in CORRECTOR_AT_NEXT_SIGMA:
        return None
    s = sigma_list(sigmas)
    worst = max((a / b for a, b in itertools.pairwise(s) if b > 0), default=1.0)
    if worst <= MAX_STEP_RATIO:
        return None
    return (
        f"{sampler} evaluates its corrector at the next sigma, and this grid of {len(s) - 1} "
        f"steps shrinks sigma {worst:.0f}x in one step (> {MAX_STEP_RATIO:.0f}x): expect a "
        "broken image; use more steps or a multistep solver (dpmpp_2m, deis, unipc, ipndm_v)"
    )


def warn_few_step(sampler: str, sigmas: Tensor | list[float]) -> None:
    """Issue a FewStepWarning when `few_step_problem` finds one."""
    problem = few_step_problem(sampler, sigmas)
    if problem is not None:
        warnings.warn(problem, FewStepWarning, stacklevel=2)
