import math

import pytest
import torch

from difforge.core import (
    CFGDenoiser,
    DiscreteVP,
    EDMPrecond,
    InvalidArgumentError,
    ModelDenoiser,
    RectifiedFlow,
    VEProcess,
    target,
)
from tests.helpers import TinyEpsNet


def test_edm_precond_is_identity_as_sigma_goes_to_zero():
    net = TinyEpsNet()
    den = EDMPrecond(net, sigma_data=0.5)
    x = torch.randn(2, 1, 8, 8)
    out = den(x, torch.full((2,), 1e-6))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)
    far = den(x, torch.full((2,), 1.0))
    assert (far - x).abs().max() > 1e-2  # it does denoise away from sigma = 0


@pytest.mark.parametrize(
    "process,prediction",
    [
        (DiscreteVP(), "eps"),
        (DiscreteVP("cosine"), "v"),
        (VEProcess(), "x0"),
        (RectifiedFlow(), "velocity"),
    ],
)
def test_model_denoiser_with_an_oracle_net_recovers_x0(process, prediction):
    """A net that outputs the true target (in its own input space) makes D return x0 exactly."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 1, 4, 4, generator=g)
    eps = torch.randn(3, 1, 4, 4, generator=g)
    sigma = torch.tensor([0.3, 2.0, 9.0])
    s4 = sigma.view(-1, 1, 1, 1)

    def oracle(x_in, t, cond):
        # the network sees x_in = s(sigma)(x0 + sigma eps) and time t; check both, return the target
        torch.testing.assert_close(x_in, process.input_scale(s4) * (x0 + s4 * eps))
        torch.testing.assert_close(process.t_to_sigma(t.double()).float(), sigma, rtol=1e-4, atol=0)
        return target(prediction, x0, eps, s4)

    den = ModelDenoiser(oracle, process, prediction)
    torch.testing.assert_close(den(x0 + s4 * eps, sigma), x0, rtol=1e-4, atol=1e-4)


def test_model_denoiser_precision_boundary():
    net = TinyEpsNet().to(torch.bfloat16)
    den = ModelDenoiser(net, DiscreteVP(), "eps")
    out = den(torch.randn(2, 1, 8, 8), torch.tensor([1.0, 2.0]))
    assert out.dtype == torch.float32


class LabelEcho:
    """Denoiser whose output is the label as a constant image; counts calls and batch sizes."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, cond=None):
        self.calls.append(x.shape[0])
        return cond["labels"].float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_cfg_one_batched_forward_and_diffusers_convention():
    inner = LabelEcho()
    cond, uncond = {"labels": torch.tensor([3, 5])}, {"labels": torch.tensor([10, 10])}
    x, sigma = torch.zeros(2, 1, 2, 2), torch.ones(2)
    out = CFGDenoiser(inner, 3.0, uncond)(x, sigma, cond)
    assert inner.calls == [4], "cond and uncond go through one forward of batch 2B"
    # x0_u + w (x0_c - x0_u) = 10 + 3 * (label - 10)
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([-11.0, -5.0]))
    # w = 1 is the plain conditional model and skips the unconditional half
    inner.calls.clear()
    out1 = CFGDenoiser(inner, 1.0, uncond)(x, sigma, cond)
    assert inner.calls == [2]
    torch.testing.assert_close(out1[:, 0, 0, 0], torch.tensor([3.0, 5.0]))
    # w = 0 is the unconditional model; per-sample scales
    out_mixed = CFGDenoiser(LabelEcho(), torch.tensor([0.0, 1.0]), uncond)(x, sigma, cond)
    torch.testing.assert_close(out_mixed[:, 0, 0, 0], torch.tensor([10.0, 5.0]))


def test_cfg_interval_and_rescale():
    uncond = {"labels": torch.tensor([10])}
    cond = {"labels": torch.tensor([2])}
    inner = LabelEcho()
    guided = CFGDenoiser(inner, 4.0, uncond, interval=(0.5, 5.0))
    x = torch.zeros(1, 1, 2, 2)
    assert guided(x, torch.tensor([10.0]), cond)[0, 0, 0, 0] == 2.0  # outside: w = 1
    assert inner.calls == [1]
    assert guided(x, torch.tensor([1.0]), cond)[0, 0, 0, 0] == 10 + 4 * (2 - 10)

    def noisy(x, sigma, cond=None):
        base = torch.arange(4.0).view(1, 1, 2, 2)
        return base * torch.where(cond["labels"] < 10, 1.0, 0.5).view(-1, 1, 1, 1)

    c = CFGDenoiser(noisy, 5.0, uncond, rescale=1.0)(x, torch.ones(1), cond)
    torch.testing.assert_close(c.std(), noisy(x, None, cond).std())  # phi = 1 matches the cond std


def test_cfg_rejects_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="finite"):
        CFGDenoiser(LabelEcho(), math.nan, {"labels": torch.tensor([1])})
    with pytest.raises(InvalidArgumentError):
        CFGDenoiser(LabelEcho(), 2.0, {"labels": torch.tensor([1])}, rescale=1.5)


def test_model_denoiser_prediction_picks_its_conversion_and_rejects_unknown_kinds():
    """forward converts with the kind `prediction` names now: reassigning it switches the
    conversion (it is looked up once per assignment, not per call), and a bad kind is refused."""
    net = TinyEpsNet()
    den = ModelDenoiser(net, DiscreteVP(), "eps")
    x, sigma = torch.randn(2, 1, 8, 8), torch.full((2,), 2.0)
    eps_out = den(x, sigma)
    den.prediction = "x0"
    x0_out = den(x, sigma)
    torch.testing.assert_close(x0_out, den.network_output(x, sigma))  # x0: the output itself
    assert (eps_out - x0_out).abs().max() > 1e-3
    with pytest.raises(InvalidArgumentError, match="prediction"):
        den.prediction = "score"
    assert den.prediction == "x0"  # a refused kind leaves the adapter as it was


def test_adapters_call_their_net_as_a_module_with_its_hooks():
    """The adapters read a Module net from `_modules` (not `nn.Module.__getattr__`): it is still
    the registered module, called through its own __call__, so its forward hooks run."""
    calls = []
    for make in (lambda n: ModelDenoiser(n, DiscreteVP(), "eps"), lambda n: EDMPrecond(n)):
        net = TinyEpsNet()
        net.register_forward_hook(lambda mod, args, out: calls.append(mod))
        den = make(net)
        den(torch.randn(1, 1, 8, 8), torch.full((1,), 1.0))
        assert calls.pop() is net and not calls
        den.net = replacement = TinyEpsNet()  # reassigned: the new module is the one called
        replacement.register_forward_hook(lambda mod, args, out: calls.append(mod))
        den(torch.randn(1, 1, 8, 8), torch.full((1,), 1.0))
        assert calls.pop() is replacement
