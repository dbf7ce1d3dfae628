"""Editing through `sample()`: img2img / SDEdit (init + start), step hooks, RePaint inpainting."""

import pytest
import torch

from difforge.core import DiscreteVP, InvalidArgumentError, ModelDenoiser
from difforge.core.editing import Inpaint
from difforge.model import to_uint8
from difforge.samplers import (
    SAMPLERS,
    PerSampleNoise,
    expected_nfe,
    get_sigmas,
    sample,
    start_for_strength,
)
from difforge.samplers.noise import stream_seeds
from tests.helpers import GaussianMixture, TinyEpsNet

SHAPE = (1, 6, 6)
GMM = GaussianMixture([[-0.6] * 36, [0.5] * 36], [0.3, 0.2], [0.5, 0.5])
SEEDS = [7, 2**40 + 1, 0]
STEPS = 8


def grid():
    return get_sigmas("karras", STEPS, 0.002, 20.0)


def images(b=3, seed=0):
    """(b, 1, 6, 6) data-space images in [-1, 1]."""
    return torch.rand((b, *SHAPE), generator=torch.Generator().manual_seed(seed)) * 2 - 1


def hole():
    m = torch.zeros(1, *SHAPE)
    m[..., 1:4, 2:5] = 1  # generate a 3x3 hole, keep the rest
    return m


def test_init_and_start_set_the_first_state_and_the_grid():
    seen = []

    def spy(x, sigma, cond=None):
        seen.append((x.clone(), sigma.clone()))
        return x * 0.5

    init, g = images(), grid()
    r = sample(spy, g, shape=SHAPE, seeds=SEEDS, sampler="euler", init=init, start=3)
    assert r.nfe == STEPS - 3 == expected_nfe("euler", STEPS - 3)
    z = PerSampleNoise(SEEDS).draw(SHAPE)
    assert torch.equal(seen[0][0], init + z * g[3].item()), "x = init + sigmas[start] * z"
    assert [s[1][0].item() for s in seen] == pytest.approx(g[3:-1].tolist())


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_img2img_is_batch_invariant_bitwise(name):
    init = images()
    batch = sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler=name, init=init, start=2)
    assert batch.nfe == expected_nfe(name, STEPS - 2)
    for i, s in enumerate(SEEDS):
        alone = sample(
            GMM, grid(), shape=SHAPE, seeds=[s], sampler=name, init=init[i : i + 1], start=2
        )
        assert torch.equal(alone.x[0], batch.x[i])


def test_later_start_stays_closer_to_init():
    init = images()
    dist = [
        (sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler="heun", init=init, start=k).x - init)
        .abs()
        .mean()
        .item()
        for k in (0, 4, STEPS - 1)
    ]
    assert dist[0] > dist[1] > dist[2] and dist[2] < 0.01, dist


def test_init_and_start_errors():
    g, init = grid(), images()
    run = lambda **kw: sample(GMM, g, shape=SHAPE, seeds=SEEDS, sampler="euler", **kw)  # noqa: E731
    for bad in (-1, STEPS, 2.0, True):
        with pytest.raises(InvalidArgumentError, match="start must be an integer"):
            run(init=init, start=bad)
    with pytest.raises(InvalidArgumentError, match="needs `init`"):
        run(start=2)
    with pytest.raises(InvalidArgumentError, match=r"init must have shape \(3, 1, 6, 6\)"):
        run(init=init[:2])
    with pytest.raises(InvalidArgumentError, match="finite"):
        run(init=init * float("nan"))


def test_step_hook_runs_before_the_callback_and_a_callback_tensor_wins():
    seen = []
    hook = lambda info: info.x * 0  # noqa: E731
    r = sample(
        GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler="euler", step_hook=hook,
        callback=lambda info: seen.append(info.x.abs().max().item()),
    )  # fmt: skip
    assert seen == [0.0] * STEPS and torch.equal(r.x, torch.zeros_like(r.x))
    r = sample(
        GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler="euler", step_hook=hook,
        callback=lambda info: info.x + 1,
    )  # fmt: skip
    assert torch.equal(r.x, torch.ones_like(r.x))


@pytest.mark.parametrize("name", sorted(SAMPLERS))
@pytest.mark.parametrize("start", [0, 3])
def test_inpainting_keeps_the_known_region_to_the_byte(name, start):
    known, m = images(), hole()
    hook = Inpaint(known, m, PerSampleNoise(SEEDS).stream(1))
    init = known if start else None
    x = sample(
        GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler=name, init=init, start=start, step_hook=hook
    ).x
    keep = (m == 0).expand_as(x)
    assert torch.equal(x[keep], known[keep])
    assert torch.equal(to_uint8(x)[keep], to_uint8(known)[keep])
    assert (x[~keep] - known[~keep]).abs().max() > 0.1, "the hole is generated, not copied"


@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_2m_sde", "dpmpp_2m"])
def test_inpainting_is_batch_invariant_and_leaves_the_samplers_noise_alone(name):
    known, m = images(), hole().expand(3, *SHAPE).clone()
    m[1] = 1 - m[1]  # a per-sample mask

    def run(idx):
        seeds = [SEEDS[i] for i in idx]
        hook = Inpaint(known[idx], m[idx], PerSampleNoise(seeds).stream(1))
        return sample(GMM, grid(), shape=SHAPE, seeds=seeds, sampler=name, step_hook=hook).x

    batch = run([0, 1, 2])
    for i in range(3):
        assert torch.equal(run([i])[0], batch[i])
    # mask = 1 everywhere: the hook returns x unchanged, and the sampler's own draws are untouched.
    full = Inpaint(known, torch.ones(1, *SHAPE), PerSampleNoise(SEEDS).stream(1))
    plain = sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler=name).x
    hooked = sample(GMM, grid(), shape=SHAPE, seeds=SEEDS, sampler=name, step_hook=full).x
    assert torch.equal(plain, hooked)


def test_known_region_carries_the_next_noise_level():
    """RePaint (Sec. 4.1): after step i the kept pixels are x_known + sigma_{i+1} eps."""
    known, m, g = images(), hole(), grid()
    first = []
    hook = Inpaint(known, m, PerSampleNoise(SEEDS).stream(1))
    sample(
        GMM, g, shape=SHAPE, seeds=SEEDS, sampler="euler", step_hook=hook,
        callback=lambda info: first.append(info.x) if info.i == 0 else None,
    )  # fmt: skip
    eps = PerSampleNoise(SEEDS).stream(1).draw(SHAPE)
    keep = (m == 0).expand_as(known)
    assert torch.equal(first[0][keep], (known + eps * g[1].item())[keep])


def test_inpainting_works_with_a_network_and_guidance():
    net = ModelDenoiser(TinyEpsNet(seed=1), DiscreteVP(), "x0")
    known, m = images(2), hole()
    x = sample(
        net, get_sigmas("karras", 5, process=DiscreteVP()), shape=SHAPE, seeds=[1, 2],
        cond={"labels": torch.tensor([1, 2])}, uncond={"labels": torch.tensor([10, 10])},
        guidance=2.0, step_hook=Inpaint(known, m, PerSampleNoise([1, 2]).stream(1)),
    ).x  # fmt: skip
    keep = (m == 0).expand_as(x)
    assert torch.equal(x[keep], known[keep])


def test_mask_errors_are_typed_and_clear():
    known = images()
    noise = PerSampleNoise(SEEDS).stream(1)
    with pytest.raises(InvalidArgumentError, match=r"mask of shape \(1, 5, 6\) does not fit"):
        Inpaint(known, torch.ones(1, 5, 6), noise)
    with pytest.raises(InvalidArgumentError, match=r"mask of shape \(2, 1, 6, 6\) does not fit"):
        Inpaint(known, torch.ones(2, *SHAPE), noise)
    for bad in (2.0, -0.5, float("nan")):
        with pytest.raises(InvalidArgumentError, match=r"mask values must be in \[0, 1\]"):
            Inpaint(known, torch.full((1, *SHAPE), bad), noise)
    with pytest.raises(InvalidArgumentError, match="x_known must be finite"):
        Inpaint(known * float("inf"), hole(), noise)
    hook = Inpaint(known, hole(), noise)  # a batch of 3 known images, sampling 2 seeds
    with pytest.raises(InvalidArgumentError, match="inpainting x_known has shape"):
        sample(GMM, grid(), shape=SHAPE, seeds=[1, 2], sampler="euler", step_hook=hook)
    Inpaint(known, hole().bool(), noise)  # a boolean mask is fine


def test_stream_seeds_are_per_sample_and_distinct():
    s = [0, 1, 2**64 - 1]
    assert stream_seeds(s, 0) == s
    a, b = stream_seeds(s, 1), stream_seeds(s, 2)
    assert len(set(a + b + s)) == 9 and all(0 <= v < 2**64 for v in a + b)
    assert stream_seeds([s[2]], 1) == [a[2]], "a derived seed depends on its own seed only"
    with pytest.raises(InvalidArgumentError, match="stream"):
        stream_seeds(s, -1)


@pytest.mark.parametrize("steps", [1, 7, 10, 50])
@pytest.mark.parametrize("strength", [0.01, 0.3, 0.75, 0.8, 1.0])
def test_start_for_strength_is_diffusers_img2img(steps, strength):
    init_timestep = min(int(steps * strength), steps)  # diffusers' get_timesteps
    want = steps - init_timestep if init_timestep > 0 else steps - 1  # at least one step here
    assert start_for_strength(steps, strength) == want
    for bad in (0, 0.0, -0.1, 1.01, float("nan"), True):
        with pytest.raises(InvalidArgumentError, match="strength"):
            start_for_strength(steps, bad)
    with pytest.raises(InvalidArgumentError, match="steps"):
        start_for_strength(0, 0.5)
