"""Run a denoiser in fixed-size chunks of rows, so that no row's arithmetic sees the batch size.

CPU conv and GEMM kernels (oneDNN, MKL) pick their blocking by shape, so one row's output can
differ in its last bits between a batch of 2 and a batch of 32 (difforge.serving.invariance has
the measurements). `ChunkedDenoiser(d, rows)` calls `d` only ever on exactly `rows` rows: a batch
of B runs as ceil(B / rows) calls, the last one padded by repeating its last row (the padding's
output is thrown away). Every row is then computed at one shape whatever the batch, and where the
kernels' output at that shape does not depend on the neighbouring rows or the row's position
(measured, and probed before serving), a row's bytes do not depend on the batch at all.

The cost: a batch smaller than `rows` pays for `rows`, and large batches run at the kernels'
efficiency at `rows` rather than at B.
"""

from __future__ import annotations

import torch
from torch import Tensor

from difforge.core.denoiser import Cond, Denoiser
from difforge.core.errors import InvalidArgumentError


def _rows(t: Tensor, i: int, j: int, size: int) -> Tensor:
    """Rows i:j of t, padded to `size` rows by repeating the last one."""
    part = t[i:j]
    pad = size - (j - i)
    if pad == 0:
        return part
    return torch.cat([part, part[-1:].expand(pad, *part.shape[1:])])


class ChunkedDenoiser:
    """`denoiser`, called only on batches of exactly `rows` rows (see the module docstring).

    Per-row inputs are x (B, ...), sigma (B,) and every conditioning tensor (B, ...).
    """

    def __init__(self, denoiser: Denoiser, rows: int):
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise InvalidArgumentError(f"chunk rows must be a positive integer, got {rows!r}")
        self.denoiser = denoiser
        self.rows = rows

    def __call__(self, x: Tensor, sigma: Tensor, cond: Cond = None) -> Tensor:
        b, c = x.shape[0], self.rows
        if sigma.shape[:1] != (b,):
            raise InvalidArgumentError(
                f"sigma must have one value per row, got {tuple(sigma.shape)}"
            )
        for k, v in (cond or {}).items():
            if v.shape[:1] != (b,):
                raise InvalidArgumentError(f"cond {k!r} must have {b} rows, got {tuple(v.shape)}")
        outs = []
        for i in range(0, b, c):
            j = min(i + c, b)
            part = None if cond is None else {k: _rows(v, i, j, c) for k, v in cond.items()}
            out = self.denoiser(_rows(x, i, j, c), _rows(sigma, i, j, c), part)
            outs.append(out[: j - i])
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def chunked(denoiser: Denoiser, rows: int | None) -> Denoiser:
    """`denoiser` run in chunks of `rows` rows; None: `denoiser` itself (the batch's own shape)."""
    return denoiser if rows is None else ChunkedDenoiser(denoiser, rows)
