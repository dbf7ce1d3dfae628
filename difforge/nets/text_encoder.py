"""A small transformer text encoder, and the net that puts it in front of a denoiser backbone.

`TextEncoder`: token ids (B, L) -> (tokens (B, L, width), mask (B, L), pooled (B, width)); pre-LN
transformer blocks (Vaswani et al. 2017; pre-LN as in GPT-2), learned positions, the [CLS] token's
output as the pooled vector. It is trained jointly with the denoiser, as in GLIDE (Nichol et al.
2022, Sec. 2.3: a transformer over the caption whose final token embeddings feed every attention
layer and whose pooled output joins the timestep embedding).

`TextConditionedNet` (kind "text_conditioned") owns both: forward(x, c_noise, cond) reads the
token ids at cond[key], encodes them and calls the backbone with cond {"context", "context_mask",
"pooled"}. One module holds all trained weights, so the training loop, EMA, checkpoints and the
model folder need no text-specific code (why: see the README's text-to-image section).

Token id conventions (difforge.data.tokenizer): 0 = [PAD] (masked out), 2 = [CLS] (always first).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets.jsonconfig import JsonConfig

PAD_ID = 0  # difforge.data.tokenizer.PAD_ID (nets import nothing from data)


@dataclass(frozen=True)
class TextEncoderConfig(JsonConfig):
    """Hyperparameters of `TextEncoder`."""

    vocab_size: int = 64  # the tokenizer's vocabulary, specials included
    max_tokens: int = 16  # L: ids per prompt ([CLS] included); positions learned up to this
    width: int = 64  # token embedding width = the backbone's context_dim
    depth: int = 2  # transformer blocks
    heads: int = 2  # attention heads; must divide width
    mlp_ratio: int = 4  # MLP hidden width = mlp_ratio * width

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_tokens", "width", "depth", "heads", "mlp_ratio"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {v!r}")
        if self.width % self.heads:
            raise InvalidArgumentError(f"heads {self.heads} does not divide width {self.width}")


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None) -> Tensor:
    """Multi-head scaled dot-product attention; q (B, T, C), k/v (B, S, C), mask (B, S) True = keep.

    Returns (B, T, C)."""
    B, T, C = q.shape
    q, k, v = (
        t.reshape(B, -1, heads, C // heads).transpose(1, 2) for t in (q, k, v)
    )  # (B,nh,*,hs)
    attn_mask = None if mask is None else mask[:, None, None, :]  # (B, 1, 1, S)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (B, nh, T, hs)
    return out.transpose(1, 2).reshape(B, T, C)


class TextBlock(nn.Module):
    """Pre-LN transformer block: x + SelfAttn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, width: int, heads: int, mlp_ratio: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width)
        )

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=2)  # (B, L, C) x3
        x = x + self.proj(attention(q, k, v, self.heads, mask))
        return x + self.mlp(self.norm2(x))  # (B, L, C)


class TextEncoder(nn.Module):
    """Token ids (B, L) int64 -> (tokens (B, L, width), mask (B, L) bool, pooled (B, width))."""

    kind = "text_encoder"

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = cfg = config
        self.embed = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos = nn.Parameter(torch.randn(cfg.max_tokens, cfg.width) * 0.02)
        self.blocks = nn.ModuleList(
            TextBlock(cfg.width, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)
        )
        self.norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: Tensor, extra: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """`extra` (B, L, width), optional: added to the input embeddings (e.g. segments)."""
        cfg = self.config
        if ids.ndim != 2 or ids.shape[1] != cfg.max_tokens or ids.is_floating_point():
            raise InvalidArgumentError(
                f"token ids must be an integer tensor (B, {cfg.max_tokens}), got "
                f"{ids.dtype} {tuple(ids.shape)}"
            )
        if int(ids.min()) < 0 or int(ids.max()) >= cfg.vocab_size:
            raise InvalidArgumentError(f"token ids must lie in [0, {cfg.vocab_size - 1}]")
        mask = ids != PAD_ID  # (B, L)
        x = self.embed(ids) + self.pos  # (B, L, C)
        if extra is not None:
            x = x + extra
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm(x)  # (B, L, C)
        return x, mask, x[:, 0]  # pooled: the [CLS] position


@dataclass(frozen=True)
class TextConditionedConfig(JsonConfig):
    """A backbone (kind + its config dict, with context_dim = encoder.width) and a text encoder."""

    backbone_kind: str = "unet"  # "unet" or "dit"
    backbone: dict[str, Any] = field(default_factory=dict)
    encoder: dict[str, Any] = field(default_factory=dict)  # TextEncoderConfig fields
    key: str = "prompt"  # the cond key holding token ids (the TextKey's name)

    def __post_init__(self) -> None:
        from difforge.nets import BACKBONES, net_config_from_dict

        if self.backbone_kind not in BACKBONES:
            raise InvalidArgumentError(
                f"backbone_kind must be one of {', '.join(BACKBONES)}, got {self.backbone_kind!r}"
            )
        enc = TextEncoderConfig.from_dict(self.encoder)
        net = net_config_from_dict(self.backbone_kind, self.backbone)
        if net.context_dim != enc.width:
            raise InvalidArgumentError(
                f"backbone context_dim {net.context_dim} must equal encoder width {enc.width}"
            )
        # store every field, defaults included, so equal nets have equal configs
        object.__setattr__(self, "encoder", enc.to_dict())
        object.__setattr__(self, "backbone", net.to_dict())

    def __getattr__(self, name: str) -> Any:
        # in_channels, image_size, ...: the backbone's (what the loop checks against the data)
        if name.startswith("_") or name in ("backbone", "encoder"):
            raise AttributeError(name)
        try:
            return self.backbone[name]
        except KeyError:
            raise AttributeError(name) from None


class TextConditionedNet(nn.Module):
    """forward(x, c_noise, cond): encode cond[key] token ids, then the backbone cross-attends."""

    kind = "text_conditioned"

    def __init__(self, config: TextConditionedConfig):
        from difforge.nets import build_net

        super().__init__()
        self.config = config
        self.text = TextEncoder(TextEncoderConfig.from_dict(config.encoder))
        self.backbone = build_net(config.backbone_kind, config.backbone)

    def forward(
        self, x: Tensor, c_noise: Tensor, cond: Mapping[str, Tensor] | None = None
    ) -> Tensor:
        """x (B, C, H, W), c_noise (B,), cond[key] (B, L) ids -> the backbone's (B, C', H, W)."""
        ids = None if cond is None else cond.get(self.config.key)
        if ids is None:  # no prompt: the null prompt ([CLS] only)
            ids = torch.zeros(x.shape[0], self.text.config.max_tokens, dtype=torch.int64)
            ids[:, 0] = 2
        tokens, mask, pooled = self.text(ids.to(x.device))
        inner = {k: v for k, v in (cond or {}).items() if k != self.config.key}
        inner |= {"context": tokens, "context_mask": mask, "pooled": pooled}
        return self.backbone(x, c_noise, inner)
