"""The one denoiser contract inside difforge, and the adapters that bring networks to it.

Contract: `denoiser(x, sigma, cond=None) -> x0_hat`, with x = x0 + sigma * eps in VE space (Karras
et al. 2022, Eq. 2), sigma a float32 tensor of shape (B,), x and x0_hat float32 of shape (B, ...).
`cond` is None or a mapping of per-sample tensors (e.g. {"labels": (B,) int64}).

Adapters are the only place a prediction type or a network's time input is known; samplers never
branch on them. The precision boundary sits at the network call: the input is cast to the
network's dtype, the output back to float32.

An adapter may also offer `prepare_grid(sigmas, batches, ndim, device)`: `difforge.samplers.sample`
calls it once per sampling call with the grid, so the per-level inputs the network needs (time
input, input scale) are computed in one vectorized pass instead of once per step (see
`ModelDenoiser.prepare_grid`). It is an optimisation only: outputs are bitwise the same without it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.core.parameterization import target, x0_converter, x0_loss_weight
from difforge.core.processes import NoiseProcess, append_dims

Cond = Mapping[str, Tensor] | None
NetCall = Callable[[Tensor, Tensor, Cond], Any]


class Denoiser(Protocol):
    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor: ...


def _unwrap(out: Any) -> Tensor:
    """Accept a tensor, or an output object with `.sample` (diffusers models), or a 1-tuple."""
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "sample"):
        return out.sample
    if isinstance(out, tuple) and len(out) >= 1 and isinstance(out[0], Tensor):
        return out[0]
    raise InvalidArgumentError(f"network returned {type(out).__name__}, expected a tensor")


def _network(owner: nn.Module) -> NetCall:
    """owner.net, read from `_modules` when it is a Module: `owner.net` would reach it through
    `nn.Module.__getattr__` (~0.7 us warm, several us cache-cold, on every step at batch 1)."""
    net = owner._modules.get("net")
    return owner.net if net is None else net


def _net_dtype(net: Any, dtype: torch.dtype | None) -> torch.dtype:
    if dtype is not None:
        return dtype
    if isinstance(net, nn.Module):
        p = next(net.parameters(), None)
        if p is not None and p.is_floating_point():
            return p.dtype
    return torch.float32


CPU = torch.device("cpu")
MEMO_LIMIT = 1024  # entries in an adapter's memo before it is cleared


LEVEL_LIMIT = 4096  # level vectors kept per process before the cache is cleared
_LEVELS: dict[tuple[float, int], Tensor] = {}  # (sigma, B) -> its (B,) vector, see level_vector
_LEVEL_IDS: dict[int, tuple[float, Tensor]] = {}  # id -> (sigma, the vector): known by identity


def level_vector(sigma: float, x: Tensor) -> Tensor:
    """sigma as the contract's (B,) float32 vector, on x's device, B = x.shape[0].

    On CPU without autograd the vector for (sigma, B) is made once per process and handed out
    again, so an adapter's memo can recognise it by identity (`memo_lookup`) instead of reading
    its values: at batch 1, right after each network call, `torch.full` and the values-keyed
    lookup cost ~27 us more cache-cold than the identity check. A vector someone wrote to (its
    version counter moved) is replaced, never reused. Elsewhere: a fresh `torch.full`."""
    if x.is_cpu and sigma > 0 and not torch.is_grad_enabled():  # NaN > 0 is False
        v = _LEVELS.get((sigma, x.shape[0]))  # _cpu_level's hit, without its frame
        return v if v is not None and not v._version else _cpu_level(sigma, x.shape[0])
    return torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)


def _cpu_level(sigma: float, b: int) -> Tensor:
    """level_vector's shared CPU vector for (sigma > 0, b)."""
    v = _LEVELS.get((sigma, b))
    if v is None or v._version:
        if len(_LEVELS) >= LEVEL_LIMIT:
            _LEVELS.clear()
            _LEVEL_IDS.clear()
        with torch.inference_mode(False):  # a normal tensor, usable in and out of inference mode
            v = torch.full((b,), sigma, dtype=torch.float32)
        _LEVELS[(sigma, b)] = v
        _LEVEL_IDS[id(v)] = (sigma, v)
    return v


def _level_of(sigma: Tensor) -> float | None:
    """The level of one of level_vector's vectors nobody wrote to (its version is 0, so its
    values are still the level's); None for any other tensor."""
    known = _LEVEL_IDS.get(id(sigma))
    if known is None or known[1] is not sigma or sigma._version:
        return None
    return known[0]


def repeat_level(sigma: Tensor, k: int) -> Tensor:
    """sigma repeated k times along the batch (guidance's cond/uncond pair): for a level vector
    the level vector of (level, k B), which adapters know by identity too; else `torch.cat`."""
    level = None if torch.is_grad_enabled() else _level_of(sigma)
    if level is None:
        return torch.cat([sigma] * k)
    return _cpu_level(level, k * sigma.shape[0])


def _remember(owner, v: Tensor, ndim: int, entry) -> None:
    """Map level vector v (and the call's ndim) to its memo entry in `owner._by_level`; the strong
    reference there keeps v's id from being reused while the entry lives."""
    if len(owner._by_level) >= MEMO_LIMIT:
        owner._by_level.clear()
    owner._by_level[(id(v), ndim)] = (v, entry)


def _reset_memo(owner) -> None:
    owner._memo.clear()
    owner._by_level.clear()
    owner._prepared.clear()


def memo_key(sigma: Tensor, ndim: int) -> tuple | None:
    """An adapter memo's key for a CPU sigma vector (B,): its values as Python floats (exact for
    float32 and float64; their count is B), dtype and the call's ndim; None where values as
    floats would not tell two vectors apart (a zero: 0.0 == -0.0) or sigma is not 1-D: those
    calls compute.

    `tolist` rather than the raw bytes: right after a network call every op and attribute read
    runs cache-cold, and this key costs about a third of `sigma.numpy().tobytes()` there (the
    memo lookup is on every step's path)."""
    if sigma.ndim != 1:
        return None
    values = sigma.tolist()
    if 0.0 in values:
        return None
    return (tuple(values), sigma.dtype, ndim)


def memo_lookup(owner, sigma: Tensor, ndim: int, compute: Callable[[Tensor, int], Any]):
    """`compute(sigma, ndim)` once per distinct CPU sigma vector in `owner._memo` (bounded: cleared,
    with `owner._prepared`, at MEMO_LIMIT entries, e.g. random sigmas in a validation loop). Off
    CPU or with autograd on it always computes: cached (maybe inference-mode) tensors could
    otherwise end up saved for backward. A hit returns the tensors the first call computed, so
    outputs are bitwise those of the uncached path. A `level_vector` seen before is found by
    identity in `owner._by_level` (while its version counter says nobody wrote to it), without
    reading its values; any other tensor by its values."""
    known = owner._by_level.get((id(sigma), ndim))  # a level vector seen before (see below)
    if (
        known is not None
        and known[0] is sigma
        and not sigma._version
        and not torch.is_grad_enabled()
    ):
        return known[1]
    # is_cpu, not device.type: building the type's string costs ~13 us cache-cold, every step
    if not sigma.is_cpu or torch.is_grad_enabled():
        return compute(sigma, ndim)
    key = memo_key(sigma, ndim)
    if key is None:
        return compute(sigma, ndim)
    hit = owner._memo.get(key)
    if hit is None:
        hit = compute(sigma.clone(), ndim)  # clone: callers may reuse their sigma
        if len(owner._memo) >= MEMO_LIMIT:
            _reset_memo(owner)
        owner._memo[key] = hit
    if _level_of(sigma) is not None:
        _remember(owner, sigma, ndim, hit)
    return hit


class ModelDenoiser(nn.Module):
    """Wrap a network trained on `process` to predict eps, x0, v or flow velocity.

    Args:
        net: callable `net(x_in, t, cond)`; its output may be a tensor or have `.sample`.
        process: the noise process the network was trained on (gives t and the input scale).
        prediction: one of "eps", "x0", "v", "velocity".
        time_scale: multiplies the time input (e.g. 1000 for flow nets trained on t in [0, 1000]).
        dtype: the network's compute dtype (defaults to its parameters' dtype).
    """

    def __init__(
        self,
        net: NetCall,
        process: NoiseProcess,
        prediction: str,
        *,
        time_scale: float = 1.0,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.net = net
        self.process = process
        self.prediction = prediction  # also picks its x0 conversion (see the property)
        self.time_scale = float(time_scale)
        self.net_dtype = _net_dtype(net, dtype)
        self._memo: dict = {}  # _time_inputs per sigma vector, see forward
        self._by_level: dict = {}  # the same entries by level vector identity (see memo_lookup)
        self._prepared: set = set()  # grids whose levels prepare_grid put in the memo

    @property
    def prediction(self) -> str:
        return self._prediction

    @prediction.setter
    def prediction(self, value: str) -> None:
        # the conversion is looked up here once, not by `to_x0`'s comparisons in every forward
        self._to_x0 = x0_converter(value)
        self._prediction = value

    def _time_inputs(self, sigma: Tensor, ndim: int) -> tuple[Tensor, Tensor, Tensor]:
        """(sigma as (B, 1, ...), the input scale s(sigma) likewise, the network's time t (B,))."""
        s = append_dims(sigma, ndim)
        t = (self.process.sigma_to_t(sigma) * self.time_scale).to(torch.float32)
        return s, self.process.input_scale(s), t

    def prepare_grid(
        self, sigmas: Sequence[float], batches: Sequence[int], ndim: int, device: Any = "cpu"
    ) -> None:
        """Put the time inputs of every positive level of a sampling grid in the memo at once.

        A fresh adapter would otherwise compute them at each level's first visit, ~10 tiny ops per
        step, which at batch 1 cost more than the sampler's own arithmetic. Here they are computed
        for the whole grid in one pass (the same elementwise ops on a (G,) vector; each element is
        bitwise what the (B,) per-step call gives: np.interp and +, *, /, sqrt are exact per
        element whatever the length) and laid out as (G, B) rows, one memo entry per level and
        batch size, keyed as `forward` looks them up. CPU and no-autograd only, like the memo; a
        grid already prepared costs one set lookup.

        Args:
            sigmas: the grid as floats (zeros are skipped: no network call happens there).
            batches: the batch sizes the network will see (B, and 2B under guidance).
            ndim: x.ndim of the calls, e.g. 4 for (B, C, H, W).
            device: where x lives; anything but CPU is a no-op.
        """
        todo = _grid_to_prepare(self, sigmas, batches, ndim, device)
        if todo is None:
            return
        levels, sizes, grid_key = todo
        g = torch.tensor(levels, dtype=torch.float32)  # float32(level), as torch.full rounds it
        sig_g, scale_g, t_g = self._time_inputs(g, 1)  # each (G,)
        n, tail = len(levels), (1,) * (ndim - 1)
        for b in sizes:
            rows = [v[:, None].expand(n, b).contiguous() for v in (sig_g, scale_g, t_g)]
            keys = rows[0].tolist()  # row i: level i's float32 value b times (see `memo_key`)
            sig_r, scale_r = (r.view(n, b, *tail).unbind(0) for r in rows[:2])
            t_r = rows[2].unbind(0)
            for i in range(n):
                key = (tuple(keys[i]), torch.float32, ndim)
                entry = self._memo.setdefault(key, (sig_r[i], scale_r[i], t_r[i]))
                _remember(self, _cpu_level(levels[i], b), ndim, entry)  # the vector samplers pass
        self._prepared.add(grid_key)

    def _net(self, x: Tensor, x_scale: Tensor, t: Tensor, cond: Cond) -> Tensor:
        x_in = x * x_scale
        if x_in.dtype != self.net_dtype:  # dtype checks here are cheaper than no-op casts
            x_in = x_in.to(self.net_dtype)
        out = _network(self)(x_in, t, cond)
        if not isinstance(out, Tensor):
            out = _unwrap(out)
        return out if out.dtype == torch.float32 else out.float()

    def network_output(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        _, x_scale, t = self._time_inputs(sigma, x.ndim)
        return self._net(x, x_scale, t, cond)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        # _time_inputs once per distinct CPU sigma vector (a sampler visits the same few levels
        # for every image, and at batch 1 these ~10 tiny ops after each network call cost more
        # than the sampler's arithmetic); the cached tensors are the first call's, so outputs are
        # bitwise the uncached path's (see `memo_lookup`)
        s, x_scale, t = memo_lookup(self, sigma, x.ndim, self._time_inputs)
        return self._to_x0(x, s, self._net(x, x_scale, t, cond))

    def loss_terms(self, x0: Tensor, sigma: Tensor, eps: Tensor, cond: Cond = None):
        """(network output, its regression target, x0-space weight 1/c_out^2) at x = x0 + sigma eps."""
        s = append_dims(sigma, x0.ndim)
        out = self.network_output(x0 + s * eps, sigma, cond)
        return out, target(self.prediction, x0, eps, s), x0_loss_weight(self.prediction, sigma)


class EDMPrecond(nn.Module):
    """EDM preconditioning D(x; sigma) = c_skip x + c_out F(c_in x; c_noise) (Karras et al. 2022, Eq. 7).

    c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
    c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (Table 1), sd = sigma_data.
    """

    def __init__(self, net: NetCall, sigma_data: float = 0.5, *, dtype: torch.dtype | None = None):
        super().__init__()
        if not (sigma_data > 0 and math.isfinite(sigma_data)):
            raise InvalidArgumentError(f"sigma_data must be positive and finite, got {sigma_data}")
        self.net = net
        self.sigma_data = float(sigma_data)
        self.net_dtype = _net_dtype(net, dtype)
        self._memo: dict = {}  # see _coefficients_memo
        self._by_level: dict = {}  # the same entries by level vector identity (see memo_lookup)
        self._prepared: set = set()  # grids whose levels prepare_grid put in the memo

    def _coefficients(self, sigma: Tensor, ndim: int):
        sd2 = self.sigma_data**2
        s = append_dims(sigma, ndim)
        c_skip = sd2 / (s**2 + sd2)
        c_out = s * self.sigma_data * (s**2 + sd2).rsqrt()
        c_in = (s**2 + sd2).rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def _coefficients_memo(self, sigma: Tensor, ndim: int):
        """`_coefficients` once per distinct CPU sigma vector, as `ModelDenoiser.forward` memoizes `_time_inputs`:
        a loaded model visits the same few levels on every call, and the cached tensors are the ones
        the first call computed (each level by the very same ops), so outputs are bitwise equal."""
        return memo_lookup(self, sigma, ndim, self._coefficients)

    def prepare_grid(
        self, sigmas: Sequence[float], batches: Sequence[int], ndim: int, device: Any = "cpu"
    ) -> None:
        """As `ModelDenoiser.prepare_grid`: c_skip, c_out and c_in for the whole grid in one pass
        (+, *, /, sqrt are exact per element whatever the length), c_noise = ln(sigma) / 4 per
        level on a (B,) tensor exactly as the step computes it (a vectorized log may differ from
        a scalar one in the last bit), so memo hits are bitwise the per-step coefficients."""
        todo = _grid_to_prepare(self, sigmas, batches, ndim, device)
        if todo is None:
            return
        levels, sizes, grid_key = todo
        c_skip, c_out, c_in, _ = self._coefficients(torch.tensor(levels, dtype=torch.float32), 1)
        n, tail = len(levels), (1,) * (ndim - 1)
        for b in sizes:
            sig = torch.tensor(levels, dtype=torch.float32)[:, None].expand(n, b).contiguous()
            keys = sig.tolist()  # row i: level i's float32 value b times (see `memo_key`)
            rows = [
                v[:, None].expand(n, b).contiguous().view(n, b, *tail).unbind(0)
                for v in (c_skip, c_out, c_in)
            ]
            for i in range(n):
                key = (tuple(keys[i]), torch.float32, ndim)
                if key not in self._memo:
                    c_noise = sig[i].clone().log() / 4  # (b,), as _coefficients takes it
                    self._memo[key] = (rows[0][i], rows[1][i], rows[2][i], c_noise)
                _remember(self, _cpu_level(levels[i], b), ndim, self._memo[key])
        self._prepared.add(grid_key)

    def forward(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        c_skip, c_out, c_in, c_noise = self._coefficients_memo(sigma, x.ndim)
        f = _unwrap(_network(self)((c_in * x).to(self.net_dtype), c_noise.float(), cond)).float()
        return c_skip * x + c_out * f

    def loss_terms(self, x0: Tensor, sigma: Tensor, eps: Tensor, cond: Cond = None):
        """F's output, its target (x0 - c_skip x) / c_out, and the x0-space weight 1/c_out^2 (Eq. 8)."""
        c_skip, c_out, c_in, c_noise = self._coefficients(sigma, x0.ndim)
        x = x0 + append_dims(sigma, x0.ndim) * eps
        f = _unwrap(self.net((c_in * x).to(self.net_dtype), c_noise.float(), cond)).float()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return f, (x0 - c_skip * x) / c_out, weight


class CountingDenoiser:
    """Counts denoiser evaluations (NFE) of one sampling call; create one per call."""

    def __init__(self, denoiser: Denoiser):
        self.denoiser = denoiser
        self.nfe = 0

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        self.nfe += 1
        return self.denoiser(x, sigma, cond)


def diffusers_unet_call(unet: Any, label_key: str = "labels") -> NetCall:
    """A `NetCall` for a diffusers `UNet2DModel`: passes cond[label_key] as `class_labels`."""

    def call(x: Tensor, t: Tensor, cond: Cond) -> Tensor:
        labels = None if cond is None else cond.get(label_key)
        return unet(x, t, class_labels=labels).sample

    return call


def _grid_to_prepare(owner, sigmas, batches, ndim: int, device) -> tuple | None:
    """What an adapter's `prepare_grid` must fill: (levels, batch sizes, grid key), or None when
    there is nothing to do (not CPU, autograd on, an empty grid, or one already prepared). Clears
    `owner`'s memo (and its prepared set) first when the grid would grow it past MEMO_LIMIT entries."""
    # `device == CPU` first: building torch.device(device).type costs ~16 us cache-cold
    if (device != CPU and torch.device(device).type != "cpu") or torch.is_grad_enabled():
        return None
    levels = tuple(float(s) for s in sigmas if s > 0)
    sizes = tuple(sorted({int(b) for b in batches if int(b) > 0}))
    grid_key = (levels, sizes, ndim)
    if not levels or not sizes or grid_key in owner._prepared:
        return None
    if len(owner._memo) + len(levels) * len(sizes) > MEMO_LIMIT:
        _reset_memo(owner)
    return levels, sizes, grid_key
