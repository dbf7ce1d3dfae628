"""Per-version outcome windows: what each served version answered lately (ok or not, latency),
the evidence `difforge.registry.should_rollback` judges a canary on.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

from difforge.registry import WindowStats
from difforge.serving.engine import Job


class OutcomeWindows:
    """What each version served in the last `window_s` seconds: (finish time, ok, latency).

    Fed by `Service.outcome_observers`; `stats` gives `should_rollback` its WindowStats.
    """

    def __init__(
        self,
        window_s: float,
        max_per_version: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.window_s = window_s
        self._clock = clock
        self._max = max_per_version
        self._lock = threading.Lock()
        self._outcomes: dict[str, deque[tuple[float, bool, float]]] = {}

    def record(self, version_id: str, ok: bool, latency_s: float) -> None:
        with self._lock:
            window = self._outcomes.setdefault(version_id, deque(maxlen=self._max))
            window.append((self._clock(), ok, latency_s))

    def observe(self, job: Job, ok: bool, latency_s: float) -> None:
        """A `Service.outcome_observers` callback."""
        self.record(job.version.id, ok, latency_s)

    def stats(self, version_id: str) -> WindowStats:
        cutoff = self._clock() - self.window_s
        with self._lock:
            window = self._outcomes.get(version_id, deque())
            while window and window[0][0] < cutoff:
                window.popleft()
            rows = list(window)
        return WindowStats.from_latencies(
            [lat for _, _, lat in rows], sum(not ok for _, ok, _ in rows)
        )

    def reset(self, version_id: str) -> None:
        with self._lock:
            self._outcomes.pop(version_id, None)
