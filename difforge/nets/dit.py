"""A Diffusion Transformer (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers").

forward(x, c_noise, cond) -> (B, out_channels, H, W), the same contract as the U-Net. The image is
cut into p x p patches (Sec. 3.2 "Patchify"), given fixed 2-D sin-cos positions, and run through
`depth` blocks conditioned by adaLN-Zero (Sec. 3.2: LayerNorm scale/shift and a residual gate
regressed from c = timestep embedding + pooled-text embedding, the regressor zero-initialised so
each block starts as the identity); each block also cross-attends to the text tokens, between
self-attention and the MLP, as in PixArt-alpha (Chen et al. 2023, Sec. 2.3, Fig. 4). The final
layer (adaLN, then a linear map to p*p*out_channels per token) is zero-initialised too.

cond is None or a mapping with optional
  "labels":       (B,) int64 in [0, num_classes] (num_classes = the null class), added to c;
  "context":      (B, L, context_dim) text tokens; missing: no cross-attention;
  "context_mask": (B, L) bool, True for real tokens;
  "pooled":       (B, context_dim) pooled text, added to c;
  "slots":        (B, slot_grid ** 2) int64 in [0, slot_classes] (slot_classes = the null): a
                  token per cell of a layout (nets/layers.SlotEmbedding, as the U-Net's); each
                  cell's embedding is added to the patch tokens inside it, their sum to c.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets.jsonconfig import JsonConfig
from difforge.nets.layers import NoiseEmbedding, SlotEmbedding, zero_module
from difforge.nets.text_encoder import attention


@dataclass(frozen=True)
class DiTConfig(JsonConfig):
    """Hyperparameters of `DiT`; stored as JSON next to the weights."""

    in_channels: int = 1
    out_channels: int = 1
    image_size: int = 28  # H = W; must be divisible by patch_size
    patch_size: int = 4  # p: tokens = (H / p)^2 (DiT uses 2, 4, 8)
    width: int = 128  # hidden size D
    depth: int = 4  # DiT blocks
    heads: int = 4  # must divide width
    mlp_ratio: int = 4
    num_classes: int = 0  # 0: no class embedding
    context_dim: int | None = None  # text token width; None: no cross-attention
    slot_grid: int = 0  # side of the slot layout (2: quadrants); must divide the patch grid
    slot_classes: int = 0  # tokens a slot can hold (classes + "empty"); the null is one more

    def __post_init__(self) -> None:
        for name in ("in_channels", "out_channels", "image_size", "patch_size", "width"):
            _check_int(name, getattr(self, name), 1)
        for name in ("depth", "heads", "mlp_ratio"):
            _check_int(name, getattr(self, name), 1)
        _check_int("num_classes", self.num_classes, 0)
        if self.context_dim is not None:
            _check_int("context_dim", self.context_dim, 1)
        if self.image_size % self.patch_size:
            raise InvalidArgumentError(
                f"patch_size {self.patch_size} does not divide image_size {self.image_size}"
            )
        _check_int("slot_grid", self.slot_grid, 0)
        _check_int("slot_classes", self.slot_classes, 0)
        if bool(self.slot_grid) != bool(self.slot_classes):
            raise InvalidArgumentError("slot_grid and slot_classes must both be 0 or both >= 1")
        if self.slot_grid and (self.image_size // self.patch_size) % self.slot_grid:
            raise InvalidArgumentError(
                f"slot_grid {self.slot_grid} must divide the patch grid "
                f"{self.image_size // self.patch_size}"
            )
        if self.width % self.heads:
            raise InvalidArgumentError(f"heads {self.heads} does not divide width {self.width}")
        if self.width % 4:
            raise InvalidArgumentError(
                f"width must be divisible by 4 (2-D sin-cos), got {self.width}"
            )


def _check_int(name: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}, got {value!r}")


def sincos_2d(width: int, grid: int) -> Tensor:
    """Fixed 2-D sin-cos positions (DiT, Sec. 3.2; MAE's get_2d_sincos_pos_embed): (grid^2, width)."""
    quarter = width // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (D/4,)
    ys, xs = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    feats = []
    for pos in (ys.flatten(), xs.flatten()):
        args = pos.double()[:, None] * omega[None]  # (T, D/4)
        feats += [torch.sin(args), torch.cos(args)]
    return torch.cat(feats, dim=1).float()  # (T, D)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: x * (1 + scale) + shift, per sample; x (B, T, D), shift/scale (B, D)."""
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """adaLN-Zero self-attention, cross-attention to text (PixArt-alpha), adaLN-Zero MLP."""

    def __init__(self, width: int, heads: int, mlp_ratio: int, context_dim: int | None):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_ratio * width, width),
        )
        # (shift, scale, gate) for attention and for the MLP, regressed from c; zero: identity
        self.ada = zero_module(nn.Linear(width, 6 * width))
        self.cross = None
        if context_dim is not None:
            self.cross = nn.ModuleDict(
                {
                    "norm": nn.LayerNorm(width, eps=1e-6),
                    "q": nn.Linear(width, width),
                    "kv": nn.Linear(context_dim, 2 * width),
                    "proj": zero_module(
                        nn.Linear(width, width)
                    ),  # identity at init, like adaLN-Zero
                }
            )

    def forward(self, x: Tensor, c: Tensor, context: Tensor | None, mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(nn.functional.silu(c)).chunk(6, 1)
        q, k, v = self.qkv(modulate(self.norm1(x), shift1, scale1)).chunk(3, dim=2)  # (B, T, D)
        x = x + gate1[:, None] * self.proj(attention(q, k, v, self.heads))
        if self.cross is not None and context is not None:
            k, v = self.cross["kv"](context.to(x.dtype)).chunk(2, dim=2)  # (B, L, D) x2
            q = self.cross["q"](self.cross["norm"](x))  # (B, T, D)
            x = x + self.cross["proj"](attention(q, k, v, self.heads, mask))
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """Patchify -> DiT blocks -> adaLN final layer -> unpatchify.

    Args:
        config: the architecture (see `DiTConfig`).
    """

    kind = "dit"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        p, D = cfg.patch_size, cfg.width
        self.grid = cfg.image_size // p
        self.patch = nn.Conv2d(cfg.in_channels, D, p, stride=p)  # (B, D, H/p, W/p)
        self.register_buffer("pos", sincos_2d(D, self.grid), persistent=False)  # (T, D)
        self.noise_embed = NoiseEmbedding(min(D, 256), D)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, D) if cfg.num_classes else None
        self.pooled_embed = nn.Linear(cfg.context_dim, D) if cfg.context_dim else None
        self.slot_embed = None
        if cfg.slot_grid:
            self.slot_embed = SlotEmbedding(cfg.slot_grid, cfg.slot_classes, D, D)
        self.blocks = nn.ModuleList(
            DiTBlock(D, cfg.heads, cfg.mlp_ratio, cfg.context_dim) for _ in range(cfg.depth)
        )
        self.norm_out = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.ada_out = zero_module(nn.Linear(D, 2 * D))
        self.out = zero_module(nn.Linear(D, p * p * cfg.out_channels))
        nn.init.xavier_uniform_(self.patch.weight.view(D, -1))

    def _embed(self, c_noise: Tensor, cond: Mapping[str, Tensor] | None, batch: int) -> Tensor:
        """c = noise embedding (+ class) (+ pooled text): (B, D)."""
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        if c_noise.shape != (batch,):
            raise InvalidArgumentError(
                f"c_noise must have shape ({batch},), got {tuple(c_noise.shape)}"
            )
        c = self.noise_embed(c_noise)  # (B, D)
        cond = cond or {}
        if self.class_embed is not None:
            labels = cond.get("labels")
            if labels is None:
                labels = torch.full((batch,), self.config.num_classes, device=c.device)
            c = c + self.class_embed(labels.long())
        if self.pooled_embed is not None and cond.get("pooled") is not None:
            c = c + self.pooled_embed(cond["pooled"].to(c.dtype))
        return c

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,) -> (B, out_channels, H, W) in x's dtype."""
        cfg, B = self.config, x.shape[0]
        c = self._embed(c_noise, cond, B).to(x.dtype)  # (B, D)
        context = None if cond is None or cfg.context_dim is None else cond.get("context")
        mask = None if context is None else cond.get("context_mask")  # (B, L)
        if context is not None and (context.ndim != 3 or context.shape[2] != cfg.context_dim):
            raise InvalidArgumentError(
                f"context must have shape ({B}, L, {cfg.context_dim}), got {tuple(context.shape)}"
            )
        h = self.patch(x).flatten(2).transpose(1, 2) + self.pos.to(x.dtype)  # (B, T, D)
        if self.slot_embed is not None:
            glob, local = self.slot_embed(cond, B, self.grid)  # (B, D), (B, D, g, g)
            c = c + glob.to(x.dtype)
            h = h + local.flatten(2).transpose(1, 2).to(x.dtype)  # each cell's over its patches
        for block in self.blocks:
            h = block(h, c, context, mask)
        shift, scale = self.ada_out(nn.functional.silu(c)).chunk(2, dim=1)  # (B, D) x2
        h = self.out(modulate(self.norm_out(h), shift, scale))  # (B, T, p*p*C)
        return self._unpatchify(h)

    def _unpatchify(self, h: Tensor) -> Tensor:
        """(B, T, p*p*C) -> (B, C, H, W)."""
        B, g, p, C = h.shape[0], self.grid, self.config.patch_size, self.config.out_channels
        h = h.reshape(B, g, g, p, p, C)
        return h.permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * p, g * p)
