"""What may share a sampler call, and the call itself (the predict step of the serving contract).

Requests are compatible when they agree on everything that is one value per sampler call: model
version, sampler, steps, sigma grid, image shape, sampler knobs, and whether classifier-free
guidance runs (a guided call doubles the forward batch, and a guidance scale of exactly 1 inside a
guided call is computed as uncond + 1 * (cond - uncond), not bitwise the conditional output).
Labels, seeds and guidance scales are per row.

`BatchPlan` decides how many rows one call holds and whether it is padded to a fixed shape; see
difforge.serving.invariance for why the shape must be fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difforge.core.sigmas import get_sigmas
from difforge.pipeline import Model
from difforge.samplers import StepInfo, sample


@dataclass(frozen=True)
class BatchKey:
    """Everything that must be equal for requests to share one sampler call."""

    version: str  # ModelVersion.id
    sampler: str
    steps: int
    grid: str
    shape: tuple[int, ...]  # (C, H, W)
    guided: bool  # classifier-free guidance on (every row has guidance != 1)
    options: tuple[tuple[str, float], ...] = ()  # sampler knobs


@dataclass(frozen=True)
class Row:
    """One image of a sampler call: its seed, its label (None: unconditional) and its guidance."""

    seed: int
    label: int | None = None
    guidance: float = 1.0


PAD_ROW = Row(seed=0)  # filler for fixed-shape calls; its output is thrown away


@dataclass(frozen=True)
class BatchPlan:
    """How one model version's sampler calls are shaped.

    mode "pad": every call holds exactly `micro(guided)` rows, padded with PAD_ROW;
    "per_sample": one row per call; "off": whatever arrived, up to `micro(guided)` rows.
    """

    mode: str
    max_rows: int  # forward rows per call (limits.max_batch_images); guidance costs 2 per image
    probe: dict[str, Any] = field(default_factory=dict)  # the invariance measurement behind it

    def micro(self, guided: bool) -> int:
        """Images per sampler call."""
        if self.mode == "per_sample":
            return 1
        return max(1, self.max_rows // (2 if guided else 1))

    @property
    def pad(self) -> bool:
        return self.mode == "pad"

    @property
    def invariant(self) -> bool:
        """True when an image's pixels cannot depend on the other requests in its call."""
        return self.mode != "off"


def sample_rows(
    model: Model,
    key: BatchKey,
    rows: Sequence[Row],
    *,
    pad_to: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> tuple[Tensor, int]:
    """One batched `sample()` call over `rows` (padded with PAD_ROW up to `pad_to`).

    Returns:
        (float32 samples (len(rows), C, H, W) in data space, NFE of the call).
    """
    all_rows = list(rows) + [PAD_ROW] * max(0, (pad_to or 0) - len(rows))
    null = model.num_classes  # the learned null class of a class-conditional net
    cond = uncond = None
    if model.num_classes:
        labels = [null if r.label is None else r.label for r in all_rows]
        cond = {"labels": torch.tensor(labels, dtype=torch.int64)}  # (B,)
        uncond = {"labels": torch.full((len(all_rows),), null, dtype=torch.int64)}  # (B,)
    guidance = torch.tensor([r.guidance for r in all_rows]) if key.guided else 1.0  # (B,)
    sigmas = get_sigmas(key.grid, key.steps, process=model.process)
    res = sample(
        model.denoiser,
        sigmas,
        shape=key.shape,
        seeds=[r.seed for r in all_rows],
        sampler=key.sampler,
        cond=cond,
        uncond=uncond,
        guidance=guidance,
        callback=callback,
        **dict(key.options),
    )
    return res.x[: len(rows)], res.nfe  # (k, C, H, W)
