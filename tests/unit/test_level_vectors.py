"""level_vector: the (B,) sigma vector a sampler hands its denoiser, made once per (sigma, B) on
CPU without autograd, and recognised by an adapter's memo by identity; never a stale answer."""

import torch

from difforge.core import DiscreteVP, EDMPrecond, ModelDenoiser, get_sigmas
from difforge.core import denoiser as core_denoiser
from difforge.core.denoiser import level_vector
from difforge.samplers import sample
from tests.helpers import TinyEpsNet


def _x(b=2):
    return torch.zeros(b, 1, 4, 4)


def test_same_level_and_batch_give_the_same_vector_under_no_grad():
    with torch.no_grad():
        a, b = level_vector(3.25, _x()), level_vector(3.25, _x())
        other_batch, other_level = level_vector(3.25, _x(3)), level_vector(3.5, _x())
    assert a is b and a.dtype == torch.float32 and a.tolist() == [3.25, 3.25]
    assert other_batch is not a and other_batch.shape == (3,)
    assert other_level is not a and other_level.tolist() == [3.5, 3.5]


def test_with_autograd_or_at_zero_each_call_gets_a_fresh_vector():
    assert level_vector(3.25, _x()) is not level_vector(3.25, _x())
    with torch.no_grad():
        assert level_vector(0.0, _x()) is not level_vector(0.0, _x())


def test_a_written_vector_is_replaced_not_reused():
    with torch.no_grad():
        v = level_vector(7.0, _x())
        v.fill_(1.0)  # a careless denoiser writes to its sigma
        w = level_vector(7.0, _x())
    assert w is not v and w.tolist() == [7.0, 7.0]


def test_made_inside_inference_mode_it_is_a_normal_tensor():
    core_denoiser._LEVELS.clear()
    with torch.inference_mode():
        v = level_vector(11.0, _x())
    assert not v.is_inference()
    with torch.no_grad():
        assert level_vector(11.0, _x()) is v  # and reused outside it


def _fresh(kind):
    if kind == "eps":
        return ModelDenoiser(TinyEpsNet(), DiscreteVP(), "eps")
    return EDMPrecond(lambda x, t, cond: x * 0.5 + t.reshape(-1, 1, 1, 1))


def test_the_memo_never_answers_for_a_vector_written_after_it_was_seen():
    for kind in ("eps", "edm"):
        den = _fresh(kind)
        x = torch.randn(2, 1, 4, 4, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            v = level_vector(5.0, x)
            first = den(x, v)
            v.fill_(2.0)  # same object, new values: the identity path must not hit
            got = den(x, v)
            want = _fresh(kind)(x, torch.full((2,), 2.0))
        assert not torch.equal(first, got), kind
        assert torch.equal(got, want), kind


def test_sampling_bytes_do_not_depend_on_the_level_cache():
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 8, process=process)
    kw = dict(shape=(1, 8, 8), seeds=[4, 5], sampler="dpmpp_2m")
    den = ModelDenoiser(TinyEpsNet(), process, "eps")
    warm = sample(den, sigmas, **kw)
    again = sample(den, sigmas, **kw)  # memo hits by identity now
    core_denoiser._LEVELS.clear()
    core_denoiser._LEVEL_IDS.clear()
    cold = sample(ModelDenoiser(TinyEpsNet(), process, "eps"), sigmas, **kw)
    assert den._by_level  # the identity path was taken
    assert torch.equal(warm.x, again.x) and torch.equal(warm.x, cold.x)


def test_a_fresh_adapter_finds_every_prepared_level_by_identity(monkeypatch):
    """prepare_grid maps the level vectors a sampler will pass straight to their memo entries:
    no step of a call on a just-built adapter reads sigma's values (memo_key never runs). That
    this path is bitwise the unprepared one: tests/unit/test_denoiser_grid.py."""
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 8, process=process)
    keyed = []
    real = core_denoiser.memo_key
    monkeypatch.setattr(core_denoiser, "memo_key", lambda *a: keyed.append(a) or real(*a))
    for den in (ModelDenoiser(TinyEpsNet(), process, "eps"), EDMPrecond(TinyEpsNet())):
        sample(den, sigmas, shape=(1, 8, 8), seeds=[4, 5], sampler="unipc")
        assert keyed == [], type(den).__name__


def test_guided_sampling_takes_the_identity_path_for_the_doubled_batch(monkeypatch):
    """CFGDenoiser's cond/uncond pair gets the level vector of (level, 2B), which prepare_grid
    registered too: no step of a guided call reads sigma's values either."""
    process = DiscreteVP()
    sigmas = get_sigmas("karras", 6, process=process)
    kw = dict(shape=(1, 8, 8), seeds=[0, 1], sampler="dpmpp_2m", guidance=2.5)
    kw |= dict(cond={"labels": torch.tensor([1, 2])}, uncond={"labels": torch.tensor([10, 10])})
    keyed = []
    real = core_denoiser.memo_key
    monkeypatch.setattr(core_denoiser, "memo_key", lambda *a: keyed.append(a) or real(*a))
    sample(ModelDenoiser(TinyEpsNet(), process, "eps"), sigmas, **kw)
    assert keyed == []


def test_repeat_level_is_a_plain_repeat_for_other_tensors():
    with torch.no_grad():
        v = level_vector(2.5, _x(3))
        doubled = core_denoiser.repeat_level(v, 2)
        other = torch.tensor([1.0, 2.0])
        assert doubled is level_vector(2.5, _x(6))
        assert torch.equal(core_denoiser.repeat_level(other, 2), torch.tensor([1.0, 2.0, 1.0, 2.0]))
        v.fill_(1.0)  # written: no longer a level vector
        assert torch.equal(core_denoiser.repeat_level(v, 2), torch.ones(6))
