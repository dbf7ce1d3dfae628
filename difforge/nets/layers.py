"""Building blocks shared by difforge's networks: noise embedding, FiLM residual blocks, attention,
slot embeddings.

Architecture only: nothing here knows what c_noise means (DDPM timestep, flow time or EDM's
ln(sigma)/4); it is embedded the same way whatever process produced it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError


def sinusoidal_embedding(c_noise: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Transformer sinusoidal features of a scalar per sample (Vaswani et al. 2017, Sec. 3.5).

    Frequencies are geometric from 1 down to 1/max_period, as in DDPM/ADM and EDM's DDPM++
    (which feeds it ln(sigma)/4). The band suits DDPM timesteps in [0, 1000] (slowest period
    ~6e4 > 1000) and inputs of order 1 (EDM c_noise, flow t: the fastest channels still turn
    by ~1 rad across the range), and every frequency is <= 1 so non-integer timesteps between
    DDPM's integer ones never alias.

    Args:
        c_noise: (B,) float noise-level input.
        dim: even embedding width.
        max_period: slowest period, in units of c_noise.

    Returns:
        (B, dim) float32: [cos(f_i c), sin(f_i c)].
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period)
        * torch.arange(half, dtype=torch.float32, device=c_noise.device)
        / half
    )  # (half,)
    args = c_noise.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)  # (B, dim)


_CONVS: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d}


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """nn.Conv1d or nn.Conv2d: the same layer (and the same state_dict keys) over 1 or 2 axes."""
    if dims not in _CONVS:
        raise ValueError(f"dims must be 1 or 2, got {dims!r}")
    return _CONVS[dims](*args, **kwargs)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero a layer's parameters so its residual branch starts as the identity (ADM, Dhariwal & Nichol 2021)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class NoiseEmbedding(nn.Module):
    """c_noise (B,) -> sinusoidal features -> 2-layer MLP -> (B, emb_dim)."""

    def __init__(self, freq_dim: int, emb_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        feats = sinusoidal_embedding(c_noise, self.freq_dim)  # (B, freq_dim) float32
        return self.mlp(feats.to(self.mlp[0].weight.dtype))  # (B, emb_dim)


class ResBlock(nn.Module):
    """GroupNorm residual block with noise-embedding scale/shift (AdaGN / FiLM; ADM, Sec. 3).

    h = conv(SiLU(GN(x))); h = GN(h) * (1 + scale) + shift; out = skip(x) + conv(drop(SiLU(h))),
    with (scale, shift) = Linear(SiLU(emb)) and the last conv zero-initialised. `dims` = 2 for
    images (B, C, H, W), 1 for series (B, C, T).
    """

    def __init__(
        self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float, dims: int = 2
    ):
        super().__init__()
        self.dims = dims
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = conv_nd(dims, in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(conv_nd(dims, out_ch, out_ch, 3, padding=1))
        self.skip = conv_nd(dims, in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, out, *spatial)
        film = self.emb(F.silu(emb)).reshape(*emb.shape[:1], -1, *(1,) * self.dims)
        scale, shift = film.chunk(2, dim=1)  # (B, out, 1[, 1]) x2
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))  # (B, out, *spatial)
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over all positions (H*W, or T), plus cross-attention to a context.

    x = x + SelfAttn(GN(x)); if context is given: x = x + CrossAttn(GN(x), context), queries
    from the image, keys/values from the (B, L, context_dim) context (Rombach et al. 2022,
    Sec. 3.3). Both output projections are zero-initialised. With `positions` (H*W), a learned
    per-position vector is added to the cross-attention queries' input, zero-initialised (so a
    warm start is unchanged): a U-Net's features carry no explicit position, and a prompt such as
    "a 7 in the top left" needs each position to pick its tokens by where it is.
    """

    def __init__(
        self, ch: int, head_dim: int, groups: int, context_dim: int | None, positions: int = 0
    ):
        super().__init__()
        self.heads = ch // head_dim
        self.norm = nn.GroupNorm(groups, ch)
        self.qkv = nn.Linear(ch, 3 * ch)
        self.proj = zero_module(nn.Linear(ch, ch))
        self.cross = None
        if context_dim is not None:
            self.cross = nn.ModuleDict(
                {
                    "norm": nn.GroupNorm(groups, ch),
                    "q": nn.Linear(ch, ch),
                    "kv": nn.Linear(context_dim, 2 * ch),
                    "proj": zero_module(nn.Linear(ch, ch)),
                }
            )
        self.query_pos = (
            nn.Parameter(torch.zeros(positions, ch)) if positions and context_dim else None
        )

    def _split(self, t: Tensor) -> Tensor:
        B, T, C = t.shape
        return t.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, nh, T, hs)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, L) True = keep
        q, k, v = self._split(q), self._split(k), self._split(v)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        B, nh, T, hs = out.shape
        return out.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)

    def forward(
        self, x: Tensor, context: Tensor | None = None, mask: Tensor | None = None
    ) -> Tensor:
        """x (B, C, H, W) or (B, C, T), context (B, L, context_dim), mask (B, L) bool (True = a
        real token)."""
        shape = x.shape
        h = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.qkv(h).chunk(3, dim=2)  # (B, HW, C) x3
        out = self.proj(self._attend(q, k, v))  # (B, HW, C)
        x = x + out.transpose(1, 2).reshape(shape)
        if self.cross is not None and context is not None:
            h = self.cross["norm"](x).flatten(2).transpose(1, 2)  # (B, HW, C)
            if self.query_pos is not None:
                h = h + self.query_pos.to(h.dtype)  # (HW, C) broadcast over the batch
            k, v = self.cross["kv"](context.to(h.dtype)).chunk(2, dim=2)  # (B, L, C) x2
            out = self.cross["proj"](self._attend(self.cross["q"](h), k, v, mask))  # (B, HW, C)
            x = x + out.transpose(1, 2).reshape(shape)
        return x


class Downsample(nn.Module):
    """Stride-2 3x3 (or 3-tap) convolution: (B, C, H, W) -> (B, C, H/2, W/2), (B, C, T) -> T/2."""

    def __init__(self, ch: int, dims: int = 2):
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, stride=2, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 (or 3-tap) conv: (B, C, H, W) -> (B, C, 2H, 2W); T -> 2T."""

    def __init__(self, ch: int, dims: int = 2):
        super().__init__()
        self.conv = conv_nd(dims, ch, ch, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SlotEmbedding(nn.Module):
    """cond["slots"] (B, g*g) tokens on a g x g grid -> a global embedding (B, emb_dim) and a
    spatial map (B, local_dim, size, size) holding each cell's token embedding over its cell.

    A token is a class in [0, classes) or "empty" (both counted in `classes`); index `classes` is
    the learned null (guidance's unconditional input), used when cond has no "slots". The map
    carries *where* each slot is, the global embedding (one per (cell, token) pair, summed)
    *what* is where, for every block.
    """

    def __init__(self, grid: int, classes: int, local_dim: int, emb_dim: int):
        super().__init__()
        self.grid, self.classes, tokens = grid, classes, classes + 1  # + the learned null
        self.local = nn.Embedding(tokens, local_dim)
        self.cell = nn.Parameter(torch.zeros(grid**2, local_dim))  # position
        self.glob = nn.Embedding(grid**2 * tokens, emb_dim)  # (slot, token) pairs
        self.tokens = tokens

    def read(self, cond: Mapping[str, Tensor] | None, batch: int, device) -> Tensor:
        """The (B, g*g) int64 slots of cond, checked; the null row when absent."""
        g2, classes = self.grid**2, self.classes
        slots = None if cond is None else cond.get("slots")
        if slots is None:
            return torch.full((batch, g2), classes, device=device)
        if slots.shape != (batch, g2) or slots.is_floating_point():
            raise InvalidArgumentError(
                f"slots must be an integer tensor of shape ({batch}, {g2}), got "
                f"{slots.dtype} {tuple(slots.shape)}"
            )
        if int(slots.min()) < 0 or int(slots.max()) > classes:
            raise InvalidArgumentError(f"slots must lie in [0, {classes}] ({classes} = null)")
        return slots.long()

    def forward(self, cond: Mapping[str, Tensor] | None, batch: int, size: int):
        """-> (glob (B, emb_dim), map (B, local_dim, size, size))."""
        slots, g = self.read(cond, batch, self.cell.device), self.grid
        offsets = torch.arange(g * g, device=slots.device) * self.tokens  # (g*g,)
        glob = self.glob(slots + offsets).sum(1)  # (B, emb_dim)
        local = self.local(slots) + self.cell  # (B, g*g, local_dim)
        local = local.transpose(1, 2).reshape(batch, -1, g, g)  # (B, local_dim, g, g) row-major
        return glob, nn.functional.interpolate(local, size=(size, size), mode="nearest")
