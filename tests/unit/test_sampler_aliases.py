"""DDIM, DDPM and consistency sampling are registered aliases of Euler ancestral (derivations:
difforge/samplers/ddim.py, difforge/samplers/consistency.py).

The bitwise checks pin the aliasing; the VP-space check keeps the derivation honest: DDIM written
with the paper's symbols (Song et al. 2021, Eq. 12 and 16) in float64 agrees with the alias to
float64 round-off, on the same grid with the same per-sample noise.
"""

import itertools
import math

import pytest
import torch

from difforge.core import DiscreteVP
from difforge.evaluation.sweep import SweepConfig
from difforge.samplers import (
    ALIASES,
    SAMPLERS,
    PerSampleNoise,
    canonical_samplers,
    get_sigmas,
    sample,
    sampler_knobs,
)
from tests.helpers import GaussianMixture

GMM = GaussianMixture([[-2.0] * 16, [1.5] * 16], [0.5, 0.3], [0.4, 0.6])
SHAPE = (1, 4, 4)
SEEDS = [3, 1, 4]


def grid(n=8):
    return get_sigmas("uniform", n, process=DiscreteVP(), spacing="leading")


def run(name, **knobs):
    return sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler=name, **knobs)


@pytest.mark.parametrize(
    ("alias", "knobs", "canonical", "canonical_knobs"),
    [
        ("ddim", {}, "euler", {}),
        ("ddim", {"eta": 0.0}, "euler_ancestral", {"eta": 0.0}),
        ("ddim", {"eta": 0.5}, "euler_ancestral", {"eta": 0.5}),
        ("ddim", {"eta": 1.0}, "ddpm", {}),
        ("ddpm", {}, "euler_ancestral", {"eta": 1.0}),
        ("ddpm", {}, "euler_ancestral", {}),
    ],
)
def test_aliases_agree_bitwise(alias, knobs, canonical, canonical_knobs):
    a, b = run(alias, **knobs), run(canonical, **canonical_knobs)
    assert torch.equal(a.x, b.x) and a.nfe == b.nfe


def test_stochastic_alias_really_draws_noise():
    """The bitwise test above could pass with noise ignored everywhere: eta changes the result."""
    assert not torch.equal(run("ddim", eta=0.5).x, run("ddim").x)


def ddim_vp_reference(x_ve, sigmas, seeds, eta):
    """DDIM in VP space, paper symbols: x_{t-1} = sqrt(ab_s) x0 + sqrt(1 - ab_s - s_eta^2) eps + s_eta z."""
    noise = PerSampleNoise(seeds)
    s = sigmas.tolist()
    x_vp = x_ve / math.sqrt(1 + s[0] ** 2)
    for t, nxt in itertools.pairwise(s):
        ab_t, ab_s = 1 / (1 + t**2), 1 / (1 + nxt**2)
        x_in = x_vp / math.sqrt(ab_t)  # the denoiser's VE input
        x0 = GMM(x_in, torch.full((x_in.shape[0],), t, dtype=torch.float32))
        eps = (x_vp - math.sqrt(ab_t) * x0) / math.sqrt(1 - ab_t)
        s_eta = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))  # Eq. 16
        x_vp = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - s_eta**2, 0.0)) * eps
        if s_eta > 0:
            x_vp = x_vp + s_eta * noise(x_vp)
    return x_vp  # sigma = 0: VP and VE coincide


@pytest.mark.parametrize("eta", [0.0, 0.3, 1.0])
def test_alias_matches_ddim_in_vp_space(eta):
    sig = grid()
    x = PerSampleNoise([9, 8, 7]).draw(SHAPE).double() * sig[0].item()  # (3, 1, 4, 4)
    ours = SAMPLERS["ddim"](GMM, x.clone(), sig, noise=PerSampleNoise([9, 8, 7]), eta=eta)
    ref = ddim_vp_reference(x.clone(), sig, [9, 8, 7], eta)
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)


def test_alias_knobs_and_canonical_list():
    assert sampler_knobs("ddim") == {"eta": 0.0} and sampler_knobs("ddpm") == {}
    assert sampler_knobs("consistency") == {}
    assert set(ALIASES) == {"ddim", "ddpm", "consistency"} and set(ALIASES.values()) <= set(
        SAMPLERS
    )
    assert not set(ALIASES) & set(canonical_samplers())
    assert set(canonical_samplers()) | set(ALIASES) == set(SAMPLERS)
    assert SweepConfig().samplers == canonical_samplers(), "'all' counts each algorithm once"


def test_consistency_is_euler_ancestral_at_infinite_eta():
    from difforge.samplers import sample_euler_ancestral

    sig = grid()
    x = PerSampleNoise(SEEDS).draw(SHAPE) * sig[0].item()
    a = SAMPLERS["consistency"](GMM, x.clone(), sig, noise=PerSampleNoise(SEEDS))
    b = sample_euler_ancestral(GMM, x.clone(), sig, noise=PerSampleNoise(SEEDS), eta=math.inf)
    assert torch.equal(a, b)


def consistency_reference(x, sigmas, seeds):
    """Song et al. 2023, Alg. 1 with eps = 0: x0 = f(x, tau_n); x = x0 + tau_{n+1} z."""
    noise = PerSampleNoise(seeds)
    s = sigmas.tolist()
    for t, nxt in itertools.pairwise(s):
        x0 = GMM(x, torch.full((x.shape[0],), t, dtype=torch.float32))
        x = x0 + nxt * noise(x0) if nxt > 0 else x0
    return x


@pytest.mark.parametrize("n", [1, 2, 5])
def test_consistency_matches_alg1_written_out(n):
    sig = get_sigmas("karras", n, 0.002, 80.0)
    x = PerSampleNoise([9, 8, 7]).draw(SHAPE).double() * sig[0].item()
    ours = SAMPLERS["consistency"](GMM, x.clone(), sig, noise=PerSampleNoise([9, 8, 7]))
    ref = consistency_reference(x.clone(), sig, [9, 8, 7])
    torch.testing.assert_close(ours, ref, atol=1e-9, rtol=1e-9)
    if n > 1:  # the reference really renoises: without z the result differs
        assert not torch.allclose(ours, GMM(x, torch.full((3,), 80.0)), atol=1e-3)
