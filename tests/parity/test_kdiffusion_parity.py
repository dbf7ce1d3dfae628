"""Parity with k-diffusion's `sampling.py` (the samplers ComfyUI and A1111 run) on a shared denoiser.

k-diffusion is not a dependency: it lives in a side environment set up as /work/shared/PEERS.md
describes, at ./peers (or $DIFFORGE_PEERS), and these tests skip when it is missing. Both libraries
take the same VE denoiser D(x; sigma) and, for SDE samplers, the same per-sample noise (two
PerSampleNoise sources with the same seeds, drawn once per step in the same order).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, get_sigmas
from difforge.samplers import SAMPLERS, PerSampleNoise
from tests.helpers import TinyEpsNet, skip_unless_real

PEERS = Path(os.environ.get("DIFFORGE_PEERS", Path(__file__).resolve().parents[2] / "peers"))
if PEERS.is_dir() and str(PEERS) not in sys.path:
    sys.path.insert(0, str(PEERS))
try:
    import k_diffusion.sampling as K
except ImportError:
    skip_unless_real(
        f"k-diffusion side environment not found at {PEERS} (bash scripts/setup_peers.sh)"
    )

SEEDS = [3, 1, 4]


@pytest.fixture(scope="module")
def setup():
    den = ModelDenoiser(TinyEpsNet(seed=2), DiscreteVP(), "eps")
    x = PerSampleNoise([9, 8, 7]).draw((1, 8, 8))
    return den, x


def k_model(den):
    return lambda x, sigma, **kw: den(x, sigma.float())


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("steps", [3, 5, 10, 25])
def test_dpmpp_3m_sde(setup, eta, steps):
    den, x0 = setup
    sig = get_sigmas("karras", steps, process=DiscreteVP())
    x = x0 * sig[0].item()
    k_noise = PerSampleNoise(SEEDS)
    ref = K.sample_dpmpp_3m_sde(
        k_model(den), x, sig.float(), eta=eta, noise_sampler=lambda s, s_next: k_noise(x),
        disable=True,
    )  # fmt: skip
    ours = SAMPLERS["dpmpp_3m_sde"](den, x, sig, noise=PerSampleNoise(SEEDS), eta=eta)
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [4, 8])
def test_dpmpp_3m_is_the_sde_at_eta_zero(setup, steps):
    den, x0 = setup
    sig = get_sigmas("karras", steps, process=DiscreteVP())
    x = x0 * sig[0].item()
    ref = K.sample_dpmpp_3m_sde(k_model(den), x, sig.float(), eta=0.0, disable=True)
    torch.testing.assert_close(SAMPLERS["dpmpp_3m"](den, x, sig), ref, atol=2e-4, rtol=1e-4)


def test_parity_detects_other_noise(setup):
    """With other noise seeds the SDE sampler differs by far more than the tolerance."""
    den, x0 = setup
    sig = get_sigmas("karras", 8, process=DiscreteVP())
    x = x0 * sig[0].item()
    k_noise = PerSampleNoise([5, 5, 5])
    ref = K.sample_dpmpp_3m_sde(
        k_model(den), x, sig.float(), noise_sampler=lambda s, s_next: k_noise(x), disable=True
    )
    ours = SAMPLERS["dpmpp_3m_sde"](den, x, sig, noise=PerSampleNoise(SEEDS))
    assert (ours - ref).abs().max() > 1e-2
