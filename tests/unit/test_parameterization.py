import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from difforge.core import PREDICTIONS, UnknownChoiceError, target, to_x0, x0_loss_weight


@pytest.mark.parametrize("prediction", PREDICTIONS)
@settings(max_examples=25, deadline=None)
@given(sigma=st.floats(0.01, 100.0), seed=st.integers(0, 10_000))
def test_target_round_trips_to_x0(prediction, sigma, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 4, generator=g, dtype=torch.float64)
    s = torch.tensor(sigma, dtype=torch.float64)
    x = x0 + s * eps
    recovered = to_x0(prediction, x, s, target(prediction, x0, eps, s))
    torch.testing.assert_close(recovered, x0, rtol=1e-9, atol=1e-9 * (1 + sigma))


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("sigma", [0.05, 1.0, 20.0])
def test_x0_loss_weight_converts_native_loss(prediction, sigma):
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(64, generator=g).double(), torch.randn(64, generator=g).double()
    s = torch.tensor(sigma, dtype=torch.float64)
    x = x0 + s * eps
    tgt = target(prediction, x0, eps, s)
    out = tgt + 0.1 * torch.randn(64, generator=g).double()  # an imperfect network output
    native = (out - tgt).pow(2).sum()
    in_x0 = (to_x0(prediction, x, s, out) - x0).pow(2).sum()
    assert native.item() == pytest.approx((x0_loss_weight(prediction, s) * in_x0).item(), rel=1e-9)


def test_unknown_prediction():
    with pytest.raises(UnknownChoiceError, match="eps, x0, v, velocity"):
        to_x0("score", torch.zeros(1), torch.ones(1), torch.zeros(1))
