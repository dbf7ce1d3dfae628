"""ModelDenoiser.prepare_grid: the grid's time inputs computed once per sampling call, bitwise
the per-step ones (so a fresh adapter costs a loaded one's overhead, and no pixel changes)."""

import pytest
import torch

from difforge.core import DiscreteVP, ModelDenoiser, RectifiedFlow, VEProcess, get_sigmas
from difforge.samplers import sample
from difforge.samplers.base import sigma_list
from tests.helpers import TinyEpsNet

CASES = [
    (DiscreteVP(), "eps", 1.0, "karras"),
    (DiscreteVP("cosine"), "v", 1.0, "exponential"),
    (DiscreteVP("scaled_linear"), "eps", 1.0, "uniform"),
    (VEProcess(), "x0", 1.0, "karras"),
    (RectifiedFlow(), "velocity", 1000.0, "uniform"),
]


class Recorder(torch.nn.Module):
    """TinyEpsNet that keeps every (x_in, t) it was called with."""

    def __init__(self):
        super().__init__()
        self.net = TinyEpsNet()
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, t, cond=None):
        self.seen.append((x.clone(), t.clone()))
        return self.net(x, t, cond)


def _grid(process, kind, n=12):
    return sigma_list(get_sigmas(kind, n, process=process))


@pytest.mark.parametrize("process,prediction,time_scale,kind", CASES)
@pytest.mark.parametrize("batch,steps", [(1, 12), (3, 12), (1, 70)])  # 70: SIMD paths, not tails
def test_prepared_levels_are_bitwise_the_per_step_ones(
    process, prediction, time_scale, kind, batch, steps
):
    grid = _grid(process, kind, steps)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    ref_net, prep_net = Recorder(), Recorder()
    ref = ModelDenoiser(ref_net, process, prediction, time_scale=time_scale)
    prep = ModelDenoiser(prep_net, process, prediction, time_scale=time_scale)
    with torch.no_grad():
        prep.prepare_grid(grid, (batch,), x.ndim)
        assert len(prep._memo) == len(grid) - 1  # one entry per positive level
        calls = []
        prep._time_inputs = lambda *a: calls.append(a) or ModelDenoiser._time_inputs(prep, *a)
        for s in grid[:-1]:
            sigma = torch.full((batch,), s, dtype=torch.float32)
            a, b = ref(x, sigma), prep(x, sigma)
            assert torch.equal(a, b)
    assert calls == []  # every level was a memo hit
    for (xa, ta), (xb, tb) in zip(ref_net.seen, prep_net.seen, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and ta.dtype == tb.dtype


def test_a_level_off_the_grid_still_computes_and_the_memo_stays_bounded():
    process = DiscreteVP()
    den = ModelDenoiser(TinyEpsNet(), process, "eps")
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        den.prepare_grid(_grid(process, "karras"), (2,), 4)
        off = torch.full((2,), 3.21, dtype=torch.float32)
        ref = ModelDenoiser(TinyEpsNet(), process, "eps")
        assert torch.equal(den(x, off), ref(x, off))
        den.prepare_grid(_grid(process, "karras"), (2,), 4)  # already prepared: no change
        assert len(den._memo) == 13
        for n in range(40, 80):  # many distinct grids: cleared before it passes 1024
            den.prepare_grid(_grid(process, "uniform", n), (2,), 4)
            assert len(den._memo) <= 1024


def test_prepare_is_a_no_op_with_autograd_or_off_cpu():
    den = ModelDenoiser(TinyEpsNet(), DiscreteVP(), "eps")
    den.prepare_grid([1.0, 0.5, 0.0], (1,), 4)  # grad enabled here
    with torch.no_grad():
        den.prepare_grid([1.0, 0.5, 0.0], (1,), 4, device="meta")
    assert den._memo == {}


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun", "euler_ancestral", "unipc"])
def test_sample_prepares_the_grid_and_pixels_do_not_change(sampler, monkeypatch):
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 8, process=process)
    fresh = ModelDenoiser(TinyEpsNet(), process, "eps")
    kw = dict(shape=(1, 8, 8), seeds=[3, 4], sampler=sampler)
    got = sample(fresh, sigmas, **kw)
    assert len(fresh._memo) >= len(sigmas) - 1
    monkeypatch.setattr(ModelDenoiser, "prepare_grid", None)  # the unprepared path
    unprepared = ModelDenoiser(TinyEpsNet(), process, "eps")
    want = sample(unprepared, sigmas, **kw)
    assert torch.equal(got.x, want.x) and got.nfe == want.nfe


def test_guided_sampling_prepares_the_doubled_batch(monkeypatch):
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 6, process=process)
    labels = {"labels": torch.tensor([1, 2])}
    null = {"labels": torch.tensor([10, 10])}
    kw = dict(shape=(1, 8, 8), seeds=[0, 1], cond=labels, uncond=null, guidance=2.5)
    fresh = ModelDenoiser(TinyEpsNet(), process, "eps")
    got = sample(fresh, sigmas, **kw)
    assert {len(k[0]) for k in fresh._memo} == {2, 4}  # the keys' values: one per row
    monkeypatch.setattr(ModelDenoiser, "prepare_grid", None)
    want = sample(ModelDenoiser(TinyEpsNet(), process, "eps"), sigmas, **kw)
    assert torch.equal(got.x, want.x)


def test_edm_precond_memo_is_bitwise_and_skips_recomputation():
    from difforge.core import EDMPrecond

    grid = _grid(VEProcess(), "karras", 40)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(2))
    ref_net, memo_net = Recorder(), Recorder()
    ref, memo = EDMPrecond(ref_net, 0.5), EDMPrecond(memo_net, 0.5)
    with torch.no_grad():
        for s in grid[:-1]:
            memo(x, torch.full((2,), s))  # first visits fill the memo
        assert len(memo._memo) == len(grid) - 1
        calls = []
        memo._coefficients = lambda *a: calls.append(a) or EDMPrecond._coefficients(memo, *a)
        memo_net.seen.clear()
        for s in grid[:-1]:
            sigma = torch.full((2,), s)
            assert torch.equal(ref(x, sigma), memo(x, sigma))
    assert calls == []
    for (xa, ta), (xb, tb) in zip(ref_net.seen, memo_net.seen, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb)
    sigma = torch.full((2,), 1.5, requires_grad=False)
    out = memo(x.requires_grad_(), sigma)  # with autograd: computed, not cached
    assert out.requires_grad and len(memo._memo) == len(grid) - 1


@pytest.mark.parametrize("batch,steps,sigma_data", [(1, 70, 0.5), (3, 12, 0.3), (20, 30, 1.0)])
def test_edm_prepared_levels_are_bitwise_the_per_step_ones(batch, steps, sigma_data):
    from difforge.core import EDMPrecond

    grid = _grid(VEProcess(), "karras", steps)
    x = torch.randn(batch, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    ref_net, prep_net = Recorder(), Recorder()
    ref, prep = EDMPrecond(ref_net, sigma_data), EDMPrecond(prep_net, sigma_data)
    with torch.no_grad():
        prep.prepare_grid(grid, (batch,), x.ndim)
        assert len(prep._memo) == len(grid) - 1
        calls = []
        prep._coefficients = lambda *a: calls.append(a) or EDMPrecond._coefficients(prep, *a)
        for s in grid[:-1]:
            sigma = torch.full((batch,), s)
            assert torch.equal(ref(x, sigma), prep(x, sigma))
    assert calls == []
    for (xa, ta), (xb, tb) in zip(ref_net.seen, prep_net.seen, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ta, tb) and ta.dtype == tb.dtype


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_edm_sample_with_a_fresh_adapter_is_unchanged(sampler, monkeypatch):
    from difforge.core import EDMPrecond

    sigmas = get_sigmas("karras", 10, process=VEProcess())
    kw = dict(shape=(1, 8, 8), seeds=[5, 6, 7], sampler=sampler)
    fresh = EDMPrecond(TinyEpsNet(), 0.5)
    got = sample(fresh, sigmas, **kw)
    assert fresh._prepared  # sample() prepared the grid
    monkeypatch.setattr(EDMPrecond, "prepare_grid", None)
    monkeypatch.setattr(EDMPrecond, "_coefficients_memo", EDMPrecond._coefficients)
    want = sample(EDMPrecond(TinyEpsNet(), 0.5), sigmas, **kw)  # no memo at all: the old path
    assert torch.equal(got.x, want.x)


def test_a_sigma_that_is_not_a_vector_computes_rather_than_keys_the_memo():
    process = DiscreteVP()
    den, ref = (
        ModelDenoiser(TinyEpsNet(), process, "eps"),
        ModelDenoiser(TinyEpsNet(), process, "eps"),
    )
    x = torch.randn(2, 1, 8, 8)
    column = torch.full((2, 1), 1.5)  # (B, 1), not (B,): appended to x's ndim all the same
    with torch.no_grad():
        assert torch.equal(den(x, column), ref(x, column.flatten()))
    assert den._memo == {}
