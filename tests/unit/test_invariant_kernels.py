"""Batch-invariant kernels (difforge.nets.invariant): a row's output is bitwise the same at every
batch size 1..64 and every position, at 1 and 2 threads; the eager kernels are the control."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets import build_net
from difforge.nets.invariant import InvariantLinear, batch_invariant, is_batch_invariant
from difforge.nets.unet import UNetConfig
from difforge.pipeline.backends import Backend

POOL = 64  # rows drawn from; batch sizes 1..POOL

UNET = UNetConfig(
    in_channels=1,
    out_channels=1,
    image_size=8,
    base_channels=16,
    channel_mults=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    head_dim=8,
    num_classes=10,
    norm_groups=4,
    context_dim=8,
)


@pytest.fixture
def threads(request):
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _randomised(net: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # zero-initialised layers would hide their kernels' rounding
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return net.eval()


def _unet_inputs(n: int):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(n, 1, 8, 8, generator=gen)  # (n, C, H, W)
    c_noise = torch.randn(n, generator=gen)  # (n,)
    cond = {
        "labels": torch.arange(n) % 11,  # the null class included
        "context": torch.randn(n, 3, 8, generator=gen),  # (n, L, context_dim)
        "context_mask": torch.arange(3)[None] <= torch.arange(n)[:, None] % 3,  # (n, L)
    }
    return x, c_noise, cond


def _rows(inputs, idx):
    x, c, cond = inputs
    return x[idx], c[idx], {k: v[idx] for k, v in cond.items()}


@pytest.fixture(scope="module")
def unet_pair():
    torch.manual_seed(0)
    net = _randomised(build_net("unet", UNET))
    return net, batch_invariant(net).eval()


def _alone(net, inputs, n: int = POOL):
    with torch.no_grad():
        return [net(*_rows(inputs, slice(i, i + 1))) for i in range(n)]


ALL_SIZES = tuple(range(1, POOL + 1))
SOME_SIZES = (1, 2, 3, 5, 8, 16, 17, 24)


@pytest.mark.parametrize(
    ("threads", "sizes"),
    [
        (1, ALL_SIZES),
        (2, SOME_SIZES),
        # every size at 2 threads: ~25 s on the shared 2-core machine
        pytest.param(2, ALL_SIZES, marks=pytest.mark.slow),
    ],
    indirect=["threads"],
)
def test_every_batch_size_and_position_gives_the_rows_alone_bits(unet_pair, threads, sizes):
    net, inv = unet_pair
    inputs = _unet_inputs(POOL)
    alone = _alone(inv, inputs, max(sizes))
    with torch.no_grad():
        for b in sizes:
            out = inv(*_rows(inputs, slice(0, b)))  # rows 0..b-1 at positions 0..b-1
            bad = [i for i in range(b) if not torch.equal(out[i : i + 1], alone[i])]
            assert not bad, f"batch {b}: rows {bad} differ from the row alone"
    if threads > 1:
        return
    # the control: the default kernels do move (else this test could not fail)
    eager_alone = _alone(net, inputs)
    with torch.no_grad():
        out = net(*_rows(inputs, slice(0, 32)))
    assert any(not torch.equal(out[i : i + 1], eager_alone[i]) for i in range(32))


@settings(max_examples=12, deadline=None)
@given(st.permutations(range(POOL)), st.integers(1, POOL))
def test_any_neighbours_in_any_order(unet_pair, order, size):
    """A row placed anywhere among any other rows: its alone bits (1 thread, torch's state)."""
    _, inv = unet_pair
    inputs = _unet_inputs(POOL)
    idx = torch.tensor(order[:size])
    with torch.no_grad():
        out = inv(*_rows(inputs, idx))
        for pos, i in enumerate(idx.tolist()):
            assert torch.equal(out[pos : pos + 1], inv(*_rows(inputs, slice(i, i + 1))))


@pytest.mark.parametrize("threads", [1, 2], indirect=True)
@pytest.mark.parametrize("kind", ["unet1d", "dit"])
def test_other_nets_are_batch_invariant(kind, threads):
    if kind == "unet1d":
        cfg = {"in_channels": 2, "out_channels": 2, "length": 16, "base_channels": 8}
        cfg |= {"channel_mults": [1, 2], "num_res_blocks": 1, "attention_resolutions": [8]}
        cfg |= {"head_dim": 8, "norm_groups": 4, "num_classes": 3}
        shape = (2, 16)
    else:
        cfg = {"in_channels": 1, "out_channels": 1, "image_size": 8, "patch_size": 2}
        cfg |= {"width": 32, "depth": 2, "heads": 4, "num_classes": 3}
        shape = (1, 8, 8)
    torch.manual_seed(0)
    inv = batch_invariant(_randomised(build_net(kind, cfg)))
    gen = torch.Generator().manual_seed(2)
    x, c = torch.randn(24, *shape, generator=gen), torch.randn(24, generator=gen)
    cond = {"labels": torch.arange(24) % 4}
    with torch.no_grad():
        alone = [inv(x[i : i + 1], c[i : i + 1], {"labels": cond["labels"][i : i + 1]})
                 for i in range(24)]  # fmt: skip
        for b in (2, 3, 7, 16, 24):
            out = inv(x[:b], c[:b], {"labels": cond["labels"][:b]})
            assert all(torch.equal(out[i : i + 1], alone[i]) for i in range(b)), b


def test_the_copy_shares_weights_and_keys_and_leaves_the_net_alone(unet_pair):
    net, inv = unet_pair
    assert is_batch_invariant(inv) and not is_batch_invariant(net)
    assert type(net.noise_embed.mlp[0]) is nn.Linear  # the original is untouched
    assert type(inv.noise_embed.mlp[0]) is InvariantLinear
    a, b = net.state_dict(), inv.state_dict()
    assert list(a) == list(b)
    assert all(a[k].data_ptr() == b[k].data_ptr() for k in a)  # shared, not copied
    inputs = _unet_inputs(8)
    with torch.no_grad():  # the same function, another summation order
        diff = (net(*inputs) - inv(*inputs)).abs().max()
    assert 0 < diff < 1e-4


def test_invariant_linear_matches_linear_on_vectors_and_tokens():
    torch.manual_seed(0)
    lin = nn.Linear(12, 5)
    inv = batch_invariant(lin)
    for x in (torch.randn(7, 12), torch.randn(3, 4, 12)):
        assert inv(x).shape == lin(x).shape
        torch.testing.assert_close(inv(x), lin(x))
    inv.bias = None
    assert torch.allclose(inv(torch.ones(2, 12)), torch.ones(2, 12) @ lin.weight.t())


def test_backend_kernels_choice_is_checked():
    assert Backend(kernels="invariant").invariant
    with pytest.raises(InvalidArgumentError, match="default, invariant"):
        Backend(kernels="fast")
    for bad in ({"kind": "compile"}, {"precision": "bfloat16"}):
        with pytest.raises(InvalidArgumentError, match="eager backend in float32"):
            Backend(kernels="invariant", **bad)


@pytest.mark.parametrize(
    ("dims", "ci", "co", "kw"),
    [
        (2, 4, 6, {"kernel_size": 3, "padding": 1}),
        (2, 4, 6, {"kernel_size": 1}),
        (2, 6, 6, {"kernel_size": 3, "stride": 2, "padding": 1}),
        (2, 1, 5, {"kernel_size": 3, "padding": 1}),  # a 1-channel input (NCHW = channels_last)
        (2, 5, 1, {"kernel_size": 3, "padding": 1}),
        (2, 4, 4, {"kernel_size": 2, "stride": 2}),  # DiT's patch embedding
        (2, 4, 8, {"kernel_size": (3, 5), "padding": (2, 1), "dilation": (2, 1), "groups": 2}),
        (1, 3, 5, {"kernel_size": 3, "stride": 2, "padding": 1}),
        (1, 3, 5, {"kernel_size": 5, "padding": 4, "dilation": 2}),
    ],
)
def test_stacked_convolution_is_the_layers_function(dims, ci, co, kw):
    """The batch as one tall image (zero gap rows between images) computes each image's conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(ci, co, **kw) if dims == 2 else nn.Conv1d(ci, co, **kw)
    inv = batch_invariant(conv)
    for size in ((7, 9), (8, 8)) if dims == 2 else ((11,), (12,)):
        x = torch.randn(3, ci, *size)
        xs = [x, x.contiguous(memory_format=torch.channels_last)] if dims == 2 else [x]
        for inp in [*xs, x[:1]]:
            with torch.no_grad():
                want, got = conv(inp), inv(inp)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _stack() -> nn.Module:
    """Large maps (16x16 = 256 pixels: InvariantGroupNorm's own channels_last path)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.GroupNorm(4, 16),
        nn.SiLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.GroupNorm(4, 16),  # 8x8: torch's kernel on a channels_last input
        nn.Conv2d(16, 8, 1),
    )
    return _randomised(net)


@pytest.mark.parametrize(
    ("threads", "sizes"), [(1, ALL_SIZES), (2, SOME_SIZES)], indirect=["threads"]
)
def test_stacked_layers_on_large_maps_are_batch_invariant(threads, sizes):
    net = _stack()
    inv = batch_invariant(net)
    assert any(type(m).__name__ == "InvariantGroupNorm" for m in inv.modules())
    x = torch.randn(POOL, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        alone = [inv(x[i : i + 1]) for i in range(max(sizes))]
        for b in sizes:
            out = inv(x[:b])
            bad = [i for i in range(b) if not torch.equal(out[i : i + 1], alone[i])]
            assert not bad, f"batch {b}: rows {bad} differ from the row alone"
        if threads == 1:  # the control: the default kernels move on these shapes
            assert not torch.equal(net(x[:16])[:1], net(x[:1]))


def test_invariant_group_norm_matches_group_norm():
    torch.manual_seed(0)
    gn = _randomised(nn.GroupNorm(4, 16))
    inv = batch_invariant(gn)
    x = torch.randn(5, 16, 16, 16) * 3 + 1
    for inp in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :8, :8]):
        torch.testing.assert_close(inv(inp), gn(inp.contiguous()), atol=2e-5, rtol=1e-5)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    assert inv(x_cl).is_contiguous(memory_format=torch.channels_last)  # the layout is kept
    inv.weight, inv.bias = None, None
    torch.testing.assert_close(inv(x_cl), nn.functional.group_norm(x, 4), atol=2e-5, rtol=1e-5)


def test_the_kept_channels_last_weight_follows_the_weight_and_autograd():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    inv = batch_invariant(conv)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        first = inv(x)
        conv.weight.mul_(2)  # in place, on the tensor both share
        torch.testing.assert_close(inv(x), conv(x))
        assert not torch.allclose(inv(x), first)
    with torch.inference_mode():
        torch.testing.assert_close(inv(x), conv(x))
    inv(x.requires_grad_()).sum().backward()  # autograd through the stacked conv
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None


@pytest.mark.parametrize("case", ["float64", "reflect", "same"])
def test_convs_the_tall_image_cannot_take_run_one_image_per_call(case):
    torch.manual_seed(0)
    kw = {"padding_mode": "reflect", "padding": 1} if case == "reflect" else {}
    conv = nn.Conv2d(2, 3, 3, padding="same") if case == "same" else nn.Conv2d(2, 3, 3, **kw)
    if case == "float64":
        conv = conv.double()
    inv = batch_invariant(conv)
    x = torch.randn(3, 2, 6, 6, dtype=conv.weight.dtype)
    with torch.no_grad():
        torch.testing.assert_close(inv(x), conv(x))
        assert torch.equal(inv(x)[1:2], inv(x[1:2]))
