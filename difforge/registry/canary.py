"""When should a canary be rolled back? A pure comparison of two traffic windows.

Serving keeps, per version, the requests, errors and latencies of a sliding window, and asks
`should_rollback(production, canary, margins)` after each window; a non-None answer is the
reason to pass to `Registry.auto_rollback_canary`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class WindowStats:
    """What one version served during a window."""

    requests: int  # requests finished in the window
    errors: int  # of which failed (5xx, timeouts, non-finite outputs)
    p95_latency_s: float | None = None  # None when no request finished

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @classmethod
    def from_latencies(cls, latencies_s: Sequence[float], errors: int) -> WindowStats:
        """Stats from the latencies of every finished request (errors included) and an error count."""
        xs = sorted(latencies_s)
        p95 = xs[min(len(xs) - 1, math.ceil(0.95 * len(xs)) - 1)] if xs else None  # nearest rank
        return cls(len(xs), errors, p95)


class RollbackMargins(BaseModel):
    """How much worse than production a canary may be before it is rolled back."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_requests: int = Field(20, ge=1)  # judge only once the canary served this many
    error_rate: float = Field(0.02, ge=0, le=1)  # canary error rate - production's above this
    latency_ratio: float = Field(1.5, ge=1)  # canary p95 / production p95 above this
    latency_floor_s: float = Field(0.05, ge=0)  # ...and the p95 difference above this


def should_rollback(
    production: WindowStats, canary: WindowStats, margins: RollbackMargins | None = None
) -> str | None:
    """A one-line reason to roll the canary back, or None while it is as good as production.

    Args:
        production, canary: the same window's stats for each version.
        margins: tolerated differences; default `RollbackMargins()`.

    Returns:
        None if the canary has too few requests to judge or is within every margin.
    """
    m = margins or RollbackMargins()
    if canary.requests < m.min_requests:
        return None
    excess = canary.error_rate - production.error_rate
    if excess > m.error_rate:
        return (
            f"canary error rate {canary.error_rate:.1%} ({canary.errors}/{canary.requests}) "
            f"exceeds production's {production.error_rate:.1%} by {excess:.1%} "
            f"(margin {m.error_rate:.1%})"
        )
    c, p = canary.p95_latency_s, production.p95_latency_s
    if c is not None and p is not None and c - p > m.latency_floor_s and c > m.latency_ratio * p:
        ratio = c / p if p > 0 else math.inf
        return (
            f"canary p95 latency {c * 1000:.0f} ms is {ratio:.2f}x production's "
            f"{p * 1000:.0f} ms (margin {m.latency_ratio:.2f}x)"
        )
    return None
