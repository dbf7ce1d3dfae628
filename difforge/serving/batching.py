"""What may share a sampler call, and the call itself (the predict step of the serving contract).

Requests are compatible when they agree on everything that is one value per sampler call: model
version, sampler, steps, sigma grid, image shape, sampler knobs, the conditioning's signature
(every key's dtype and shape, so rows with prompts or masks stack when their shapes agree) and
whether classifier-free guidance runs (a guided call doubles the forward batch, and a guidance scale
of exactly 1 inside a guided call is computed as uncond + 1 * (cond - uncond), not bitwise the
conditional output), the LoRA adapter that samples, and for edits the start index, whether a mask is re-imposed and RePaint's
resampling (EditSettings). A row's resolved conditioning, seed, guidance scale, init image and
mask are its own.

`BatchPlan` decides how many rows one call holds and at which shape the network runs: padded to one
fixed call shape ("pad") or in fixed chunks of rows whatever the call holds ("chunk"); see
difforge.serving.invariance for why the shape must be fixed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difforge.pipeline import Model, Plan
from difforge.pipeline.conditioning import Row as Conditioning
from difforge.pipeline.conditioning import Signature
from difforge.pipeline.editing import Edit, EditRow, EditSettings, pad_row
from difforge.samplers import StepInfo


@dataclass(frozen=True)
class BatchKey:
    """Everything that must be equal for requests to share one sampler call."""

    version: str  # ModelVersion.id
    sampler: str
    steps: int
    grid: str
    shape: tuple[int, ...]  # (C, H, W)
    guided: bool  # classifier-free guidance on (every row has guidance != 1)
    options: tuple[tuple[str, Any], ...] = ()  # sampler knobs
    cond: Signature = ()  # (key, dtype, shape) of every conditioning key
    edit: EditSettings | None = None  # img2img / inpainting: start index, mask on, resampling
    adapter: str | None = None  # the LoRA adapter that samples (different ones never share)

    def plan(self) -> Plan:
        """The per-call settings as a Plan (rows, seeds and guidance come per row)."""
        return Plan(
            (),
            {},
            (),
            2.0 if self.guided else 1.0,
            self.sampler,
            self.steps,
            self.grid,
            self.options,
            "json",
            None,
            adapter=self.adapter,
        )


@dataclass(frozen=True, eq=False)
class Row:
    """One image of a sampler call: its seed, its resolved conditioning ({} for the model's null
    conditioning), its guidance scale, guidance's unconditional row (None: the null one; a
    negative prompt otherwise; same signature, so rows with and without one share a call) and its
    edit inputs."""

    seed: int
    cond: Conditioning = field(default_factory=dict)
    guidance: float = 1.0
    uncond: Conditioning | None = None
    edit: EditRow | None = None  # its init image and mask (when the key has an edit)


PAD_ROW = Row(seed=0)  # filler for fixed-shape calls (the null conditioning); output thrown away


@dataclass(frozen=True)
class BatchPlan:
    """How one model version's sampler calls are shaped.

    mode "pad": every call holds exactly `micro(guided)` images, padded with PAD_ROW;
    "chunk": whatever arrived, up to `micro(guided)` images, the network run on exactly
    `chunk_rows` forward rows at a time (difforge.core.chunked): a lone image costs one chunk;
    "kernels": whatever arrived, up to `micro(guided)` images, in one network call on the
    version's batch-invariant kernels (invariance.serving_model); "per_sample": one image per
    call; "off": whatever arrived, up to `micro(guided)` images.
    """

    mode: str
    max_rows: int  # forward rows per call (limits.max_batch_images); guidance costs 2 per image
    probe: dict[str, Any] = field(default_factory=dict)  # the invariance measurement behind it
    chunk_rows: int | None = None  # forward rows per network call, mode "chunk" only

    def __post_init__(self) -> None:
        if (self.mode == "chunk") != (self.chunk_rows is not None):
            raise ValueError(f"chunk_rows goes with mode 'chunk' only (mode {self.mode!r})")

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

    def describe(self) -> dict[str, Any]:
        """How the version batches, as /v1/models and every response report it."""
        return {"mode": self.mode, "invariant": self.invariant, "chunk_rows": self.chunk_rows}


def sample_rows(
    model: Model,
    key: BatchKey,
    rows: Sequence[Row],
    *,
    pad_to: int | None = None,
    chunk_rows: int | None = None,
    callback: Callable[[StepInfo], None] | None = None,
) -> tuple[Tensor, int]:
    """One batched sampler call over `rows` (padded with PAD_ROW up to `pad_to`), the network
    run on `chunk_rows` forward rows at a time when given.

    Returns:
        (float32 sampler output (len(rows), *latent_shape), NFE of the call); `model.decode`
        turns it into pixels.
    """
    all_rows = list(rows) + [PAD_ROW] * max(0, (pad_to or 0) - len(rows))
    null = model.spec.null_row()
    conds = [r.cond or null for r in all_rows]
    unconds = [r.uncond or null for r in all_rows] if any(r.uncond for r in all_rows) else None
    guidance = torch.tensor([r.guidance for r in all_rows]) if key.guided else None  # (B,)
    edit = None
    if key.edit is not None:  # padding rows edit a zero image, generated everywhere
        filler = pad_row(model, key.edit)
        edit = Edit(key.edit, tuple(r.edit or filler for r in all_rows))
    x, nfe = model.sample_latents(
        conds,
        key.plan(),
        seeds=[r.seed for r in all_rows],
        guidance=guidance,
        uncond=unconds,
        callback=callback,
        edit=edit,
        chunk_rows=chunk_rows,
    )
    return x[: len(rows)], nfe  # (k, *latent_shape)
