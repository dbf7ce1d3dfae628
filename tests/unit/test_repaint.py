"""RePaint resampling through `sample(..., resample=(jump_length, jump_n_sample))`."""

import itertools
import math

import pytest
import torch

from difforge.core import InvalidArgumentError
from difforge.core.editing import Inpaint
from difforge.samplers import PerSampleNoise, get_sigmas, sample
from difforge.samplers.repaint import jump_schedule
from tests.helpers import GaussianMixture

SHAPE = (1, 4, 4)
GMM = GaussianMixture([[-0.6] * 16, [0.5] * 16], [0.3, 0.2], [0.5, 0.5])
SEEDS = [5, 2**33, 1]


def grid(n=12):
    return get_sigmas("karras", n, 0.002, 20.0)


def inpaint(seeds=SEEDS):
    known = torch.rand((len(seeds), *SHAPE), generator=torch.Generator().manual_seed(3)) * 2 - 1
    m = torch.zeros(1, *SHAPE)
    m[..., 1:3, 1:3] = 1
    return known, m, Inpaint(known, m, PerSampleNoise(seeds).stream(1))


@pytest.mark.parametrize(("n", "length", "count"), [(20, 3, 4), (25, 10, 10), (7, 1, 2), (5, 9, 3)])
def test_schedule_is_diffusers_repaint_schedule(n, length, count):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.RePaintScheduler(num_train_timesteps=n)
    sched.set_timesteps(n, jump_length=length, jump_n_sample=count)
    theirs = [0] + [n - int(t) for t in sched.timesteps]  # state index after each timestep
    path = jump_schedule(n, length, count)
    assert path == theirs
    assert path[0] == 0 and path[-1] == n
    assert all(abs(b - a) == 1 for a, b in itertools.pairwise(path))


def test_one_sample_per_jump_is_no_resampling_bitwise():
    plain = sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler="euler_ancestral")
    once = sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler="euler_ancestral", resample=(3, 1))
    assert torch.equal(plain.x, once.x) and plain.nfe == once.nfe


def test_steps_and_renoising_follow_the_schedule():
    """Denoiser calls at the sigma of every downward move; the first re-noising adds
    sqrt(sigma_hi^2 - sigma_lo^2) z with z from the samples' stream 2, bitwise."""
    calls = []

    def spy(x, sigma, cond=None):
        calls.append((x.clone(), sigma[0].item()))
        return x * 0.5

    g = grid(6)
    s = g.tolist()
    r = sample(spy, g, shape=SHAPE, seeds=SEEDS, sampler="euler", resample=(2, 2))
    path = jump_schedule(6, 2, 2)
    down = [a for a, b in itertools.pairwise(path) if b == a + 1]
    assert r.nfe == len(down) == len(calls) > 6
    assert [c[1] for c in calls] == pytest.approx([s[a] for a in down], rel=1e-6)
    k = next(i for i in range(len(path) - 1) if path[i + 1] < path[i])  # first upward move
    hi, lo = path[k], path[k] - 2  # jump_length 2: two levels up, then a step down from lo
    x_before = calls[k - 1][0]
    x_hi = x_before + (x_before - x_before * 0.5) * ((s[hi] - s[hi - 1]) / s[hi - 1])  # euler
    z = PerSampleNoise(SEEDS).stream(2).draw(SHAPE)
    assert torch.equal(calls[k][0], x_hi + z * math.sqrt(s[lo] ** 2 - s[hi] ** 2))


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m", "heun"])
def test_resampled_inpainting_keeps_pixels_and_is_batch_invariant(name):
    known, m, hook = inpaint()
    kw = {"shape": SHAPE, "sampler": name, "resample": (3, 3)}
    batch = sample(GMM, grid(), seeds=SEEDS, step_hook=hook, **kw).x
    keep = (m == 0).expand_as(batch)
    assert torch.equal(batch[keep], known[keep])
    for i, seed in enumerate(SEEDS):
        k = known[i : i + 1]
        alone = sample(
            GMM,
            grid(),
            seeds=[seed],
            step_hook=Inpaint(k, m, PerSampleNoise([seed]).stream(1)),
            **kw,
        ).x
        assert torch.equal(alone[0], batch[i])
    plain = sample(GMM, grid(), seeds=SEEDS, step_hook=inpaint()[2], shape=SHAPE, sampler=name).x
    assert not torch.equal(plain, batch), "resampling changes the generated region"


def test_resample_errors():
    for bad in [(0, 2), (2, 0), (2.0, 2), (True, 2)]:
        with pytest.raises(InvalidArgumentError, match="RePaint"):
            sample(GMM, grid(), shape=SHAPE, seeds=[0], sampler="euler", resample=bad)
    for bad in [(2,), "ab", 3]:
        with pytest.raises(InvalidArgumentError, match="resample must be"):
            sample(GMM, grid(), shape=SHAPE, seeds=[0], sampler="euler", resample=bad)


def test_resampling_harmonizes_the_hole_with_the_known_pixels():
    """RePaint's claim (Sec. 4.2), measured: two well-separated modes (means -1 and +1, std 0.3,
    16 pixels), half the pixels known from one mode; the generated half should come from the same
    mode. Re-imposition alone (DDPM = euler_ancestral) gets 96.0% of 200 right at 10 steps and
    99.5% at 34; with resample=(2, 4) on the 10-step grid (34 NFE) all 200. Deterministic: fixed
    seeds. (At equal NFE the gain is one image in 200 here; the test pins the 10-step gain.)"""
    n, d = 200, 16
    gmm = GaussianMixture([[-1.0] * d, [1.0] * d], [0.3, 0.3], [0.5, 0.5])
    comp = torch.arange(n) % 2  # the known pixels' mode
    gen = torch.Generator().manual_seed(0)
    known = (comp[:, None] * 2.0 - 1) + 0.3 * torch.randn(n, d, generator=gen)
    known = known.reshape(n, *SHAPE)
    mask = torch.zeros(1, *SHAPE)
    mask[..., 2:] = 1  # generate the two right columns

    def right_mode(steps, resample=None):
        seeds = list(range(n))
        hook = Inpaint(known, mask, PerSampleNoise(seeds).stream(1))
        g = get_sigmas("karras", steps, 0.002, 20.0)
        r = sample(
            gmm,
            g,
            shape=SHAPE,
            seeds=seeds,
            sampler="euler_ancestral",
            step_hook=hook,
            resample=resample,
        )
        hole = r.x[..., 2:].reshape(n, -1).mean(1)
        return ((hole > 0).long() == comp).float().mean().item(), r.nfe

    plain, plain_nfe = right_mode(10)
    same_nfe, _ = right_mode(34)
    resampled, nfe = right_mode(10, (2, 4))
    assert nfe == 34 and plain_nfe == 10
    assert plain <= 0.97 and resampled >= max(0.995, same_nfe), (plain, same_nfe, resampled)
