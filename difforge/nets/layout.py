"""A layout planner: a prompt's token ids -> a distribution over slot layouts, sampled per image.

Two-stage text-to-image, as in LLM-grounded Diffusion (Lian et al. 2023, "LLM-grounded
Diffusion", Sec. 3: a text-to-layout stage, then a layout-grounded diffusion stage): the planner
reads the prompt and draws one token per cell of a g x g grid (a class, or "empty"); the denoiser
takes that layout through its slot path (nets/unet.py `SlotEmbedding`) beside the prompt's tokens
through cross-attention. Why a separate stage: a denoiser trained only by the denoising loss learns
where a prompt puts a digit slowly (measured: a scenes text U-Net with cross-attention and a learned
text-to-layout map reached 9% on position prompts after 3500 steps; the README's text-to-image
section), while "which quadrant holds what" is a small supervised problem with the scene's layout as
its label.

The layout is autoregressive over cells (row-major), p(s_1..s_n | y) = prod_j p(s_j | s_<j, y),
so an open statement ("two sevens") gets a coherent joint draw (exactly two 7s) instead of four
independent marginals. Each cell's query is its position embedding plus the previous cell's token;
blocks are pre-LN (causal self-attention over cells, cross-attention to the prompt's tokens with
the padding mask, MLP). Optional segment embeddings (the index of the clause a token is in, counted
by `separators`) make "which digit goes with which position" a match of equal segments. `sample` draws s_j by inverse CDF from given uniforms, so a draw is a pure
function of (ids, u): the caller seeds u per image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from difforge.core.errors import InvalidArgumentError
from difforge.nets.jsonconfig import JsonConfig
from difforge.nets.text_encoder import TextEncoder, TextEncoderConfig, attention


@dataclass(frozen=True)
class LayoutPlannerConfig(JsonConfig):
    """Hyperparameters of `LayoutPlanner`; `encoder` holds TextEncoderConfig fields."""

    cells: int = 4  # slots in the layout (g * g), row-major
    tokens: int = 11  # tokens a cell can hold: the classes and "empty" (the slot key's empty)
    depth: int = 2  # decoder blocks
    encoder: dict[str, Any] = field(default_factory=dict)
    # token ids that end a clause (e.g. "and", ","): each token gets a learned embedding of its
    # clause index (separators before it), as BERT's segment embeddings; () = none
    separators: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("cells", "tokens", "depth"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InvalidArgumentError(f"{name} must be an integer >= 1, got {v!r}")
        object.__setattr__(self, "encoder", TextEncoderConfig.from_dict(self.encoder).to_dict())
        object.__setattr__(self, "separators", tuple(int(t) for t in self.separators))

    @property
    def width(self) -> int:
        return self.encoder["width"]


class PlannerBlock(nn.Module):
    """x + CausalSelfAttn(LN(x)); x + CrossAttn(LN(x), text); x + MLP(LN(x)); x (B, n, C)."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(width) for _ in range(3))
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.q, self.kv = nn.Linear(width, width), nn.Linear(width, 2 * width)
        self.proj_x = nn.Linear(width, width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width)
        )

    def forward(self, x: Tensor, text: Tensor, mask: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=2)
        q, k, v = (t.reshape(b, n, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, n, c))
        k, v = self.kv(text).chunk(2, dim=2)  # (B, L, C) x2
        x = x + self.proj_x(attention(self.q(self.norm2(x)), k, v, self.heads, mask))
        return x + self.mlp(self.norm3(x))


class LayoutPlanner(nn.Module):
    """logits(ids, slots): (B, cells, tokens) by teacher forcing; sample(ids, u): (B, cells)."""

    kind = "layout_planner"

    def __init__(self, config: LayoutPlannerConfig):
        super().__init__()
        self.config = cfg = config
        enc = TextEncoderConfig.from_dict(cfg.encoder)
        self.text = TextEncoder(enc)
        self.cell = nn.Parameter(torch.randn(cfg.cells, enc.width) * 0.02)
        self.prev = nn.Embedding(cfg.tokens + 1, enc.width)  # the previous cell's token; + start
        self.blocks = nn.ModuleList(PlannerBlock(enc.width, enc.heads) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(enc.width)
        self.head = nn.Linear(enc.width, cfg.tokens)
        self.segment = nn.Embedding(enc.max_tokens, enc.width) if cfg.separators else None
        self.register_buffer("seps", torch.tensor(cfg.separators, dtype=torch.int64), False)

    def encode(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """Token ids (B, L) -> (tokens (B, L, C), mask (B, L)), with segment embeddings."""
        extra = None
        if self.segment is not None:
            sep = torch.isin(ids, self.seps).long()  # (B, L)
            seg = sep.cumsum(1) - sep  # separators before a token: a separator ends its clause
            extra = self.segment(seg.clamp(max=self.segment.num_embeddings - 1))  # (B, L, C)
        text, mask, _ = self.text(ids, extra)
        return text, mask

    def logits(self, ids: Tensor, slots: Tensor) -> Tensor:
        """Cell j's logits given the true tokens of cells < j: ids (B, L), slots (B, cells)."""
        cfg = self.config
        if slots.shape != (ids.shape[0], cfg.cells) or slots.is_floating_point():
            raise InvalidArgumentError(
                f"slots must be an integer tensor ({ids.shape[0]}, {cfg.cells}), got "
                f"{slots.dtype} {tuple(slots.shape)}"
            )
        return self._decode(*self.encode(ids), slots)

    def _decode(self, text: Tensor, mask: Tensor, slots: Tensor) -> Tensor:
        """Every cell's logits from the encoded prompt and the tokens of the cells before it."""
        cfg = self.config
        start = torch.full_like(slots[:, :1], cfg.tokens)
        x = self.prev(torch.cat([start, slots[:, :-1]], dim=1)) + self.cell  # (B, cells, C)
        for block in self.blocks:
            x = block(x, text, mask)
        return self.head(self.norm(x)).float()  # (B, cells, tokens)

    @torch.no_grad()
    def sample(self, ids: Tensor, u: Tensor, temperature: float = 1.0) -> Tensor:
        """Draw each cell in turn by inverse CDF: u (B, cells) uniforms in [0, 1) -> int64 slots.

        temperature 0 takes the most likely token of each cell (greedy)."""
        cfg = self.config
        if u.shape != (ids.shape[0], cfg.cells):
            raise InvalidArgumentError(f"u must have shape ({ids.shape[0]}, {cfg.cells})")
        slots = torch.zeros(ids.shape[0], cfg.cells, dtype=torch.int64, device=ids.device)
        text, mask = self.encode(ids)  # once: only the decoder depends on the cells drawn
        for j in range(cfg.cells):
            logits = self._decode(text, mask, slots)[:, j].double()  # (B, tokens)
            if temperature == 0:
                slots[:, j] = logits.argmax(1)
                continue
            cdf = torch.softmax(logits / temperature, dim=1).cumsum(1)  # (B, tokens)
            pick = (cdf <= u[:, j : j + 1].double()).sum(1)  # first index whose cdf exceeds u
            slots[:, j] = pick.clamp(max=cfg.tokens - 1)
        return slots
