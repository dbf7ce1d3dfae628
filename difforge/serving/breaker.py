"""A circuit breaker for fallback under load: when the service misses its latency or queue-wait
SLO for a window, requests that allow it are served by a cheaper route (difforge.serving.fallback
decides which and how), and the breaker closes again once load has fallen.

States (Nygard, "Release It!", ch. 5, Circuit Breaker; here it switches routes, it never refuses):

    closed     every request takes its normal route. The breaker watches a sliding window of
               the last `window_s` seconds of finished normal-route requests; with at least
               `min_samples` of them, it opens when their p95 latency exceeds `latency_slo_s`
               or their p95 queue wait exceeds `queue_wait_slo_s`.
    open       degradable requests take the cheap route; the others their normal one. After a
               cool-down it turns half-open: `cooldown_s`, doubled after each reopening without
               a close in between, up to `max_cooldown_s` (a sustained overload is probed less
               and less often: every probe costs the requests queued behind it).
    half_open  the next `probes` degradable requests that find the queue empty take the normal
               route (probes: a full-cost call holds up everything queued behind it, so none is
               sent into a queue), the rest stay degraded; requests that may not be degraded
               take the normal route anyway and count as probes too. If `min_samples` requests
               finish before the probes could run, the queue never emptied: it reopens. A probe
               that fails, misses an SLO, or even finishes above
               `close_ratio` x the SLO (hysteresis: load has not fallen) reopens the breaker at
               once. Once the probes have passed and at least `min_samples` requests of any
               route have finished in this trial (those queued behind a probe pay for it), the
               trial's p95 decides: within `close_ratio` x the SLOs the breaker closes and
               forgets its window, otherwise it reopens.

Open or half-open, a breaker that admits and records nothing for `window_s` closes: no traffic is
no load (and an idle service must not look degraded on the dashboards).

The breaker is pure: time comes from an injected `clock` (time.monotonic by default), nothing
here does I/O, and one breaker is driven from one thread (the service's event loop).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

BreakerState = Literal["closed", "open", "half_open"]
STATES: tuple[BreakerState, ...] = ("closed", "open", "half_open")
# degrade (a ServiceConfig choice): never - no request is ever degraded (the breaker still
# watches, its state is exported); allowed - requests with "allow_degraded": true are, while the
# breaker is open; always_when_open - every request is unless it says "allow_degraded": false
DegradePolicy = Literal["never", "allowed", "always_when_open"]
Route = Literal["normal", "degraded", "probe"]
# why the breaker opened: the label of difforge_degraded_requests_total
OpenReason = Literal["latency", "queue_wait"]
OPEN_REASONS: tuple[OpenReason, ...] = ("latency", "queue_wait")


class BreakerConfig(BaseModel):
    """When the breaker opens and closes, and what the cheap route is (ServiceConfig.breaker).

    The cheap route re-resolves the request with `degraded_steps` steps (and `degraded_sampler`
    when set), so a degraded answer has exactly the pixels of a normal request with those
    settings. When the router holds a fast version (a distilled student of production), the cheap
    route is that student with its own defaults, at `fast_steps` steps (None: its default).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    degrade: DegradePolicy = "allowed"
    latency_slo_s: float = Field(10.0, gt=0, allow_inf_nan=False)  # p95, accepted -> answered
    queue_wait_slo_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # p95; None: unwatched
    window_s: float = Field(30.0, gt=0, allow_inf_nan=False)  # the sliding window
    min_samples: int = Field(10, ge=1)  # finished requests in the window before it may open
    cooldown_s: float = Field(10.0, gt=0, allow_inf_nan=False)  # open -> half_open, at first
    # the longest cool-down after repeated reopenings (None: 8 x cooldown_s)
    max_cooldown_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    probes: int = Field(3, ge=1)  # normal-route requests that must pass to close it
    close_ratio: float = Field(0.7, gt=0, le=1, allow_inf_nan=False)  # hysteresis
    degraded_steps: int = Field(4, ge=1)
    degraded_sampler: str | None = None  # None: the request's own sampler
    fast_steps: int | None = Field(None, ge=1)  # steps on the fast version (None: its default)

    @model_validator(mode="after")
    def _known_sampler(self) -> BreakerConfig:
        if self.max_cooldown_s is not None and self.max_cooldown_s < self.cooldown_s:
            raise ValueError("max_cooldown_s must be at least cooldown_s")
        if self.degraded_sampler is not None:
            from difforge.core.errors import check_choice
            from difforge.samplers import SAMPLERS

            check_choice("degraded_sampler", self.degraded_sampler, SAMPLERS)
        return self


@dataclass(frozen=True)
class Sample:
    """One finished request as the breaker sees it."""

    t: float  # clock() when it finished
    queue_wait_s: float
    latency_s: float
    route: Route


def p95(values: list[float]) -> float:
    """Nearest-rank 95th percentile (the smallest value >= 95% of them); nan when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


class Breaker:
    """The state machine (see the module docstring).

    Args:
        config: thresholds and timings.
        clock: seconds, monotonic (tests pass a fake).
        on_change: called with (new state, reason) on every transition (metrics).
    """

    def __init__(
        self,
        config: BreakerConfig,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BreakerState, OpenReason | None], None] | None = None,
    ):
        self.config = config
        self.clock = clock
        self.on_change = on_change
        self._state: BreakerState = "closed"
        self._since = clock()
        self.reason: OpenReason | None = None  # why it is open (kept while half-open)
        self._window: deque[Sample] = deque()
        self._probes_out = 0  # probes admitted in this half-open spell, not yet finished
        self._probes_passed = 0
        self._trial: list[Sample] = []  # requests finished in this half-open spell
        self._reopened = 0  # reopenings since the last close (the cool-down doubles)
        self._active = self._since  # the last admit or record: no traffic at all is no load

    @property
    def state(self) -> BreakerState:
        self._tick(self.clock())
        return self._state

    def admit(self, degradable: bool, queued: int = 0) -> Route:
        """The route of a new request (`degradable`: the policy lets this one be degraded;
        `queued`: requests waiting for a sampler call now, which a probe would hold up)."""
        state = self.state
        self._active = self.clock()
        if state == "closed" or not degradable:
            return "normal"
        probes_left = self._probes_out + self._probes_passed < self.config.probes
        if state == "half_open" and probes_left and queued == 0:
            self._probes_out += 1
            return "probe"
        return "degraded"

    def record(self, route: Route, queue_wait_s: float, latency_s: float, ok: bool = True) -> None:
        """A request admitted on `route` finished (ok: it was answered; False: it failed on the
        service's side, e.g. missed its deadline)."""
        now = self.clock()
        self._tick(now)
        self._active = now
        self._window.append(Sample(now, queue_wait_s, latency_s, route))
        self._prune(now)
        if route == "probe":
            self.release(route)
        if self._state == "half_open":
            self._judge_trial(self._window[-1], ok)
        elif self._state == "closed" and route == "normal":
            reason = self._breach()
            if reason is not None:
                self._move("open", reason, now)

    def release(self, route: Route) -> None:
        """A request admitted on `route` ended without a measurement (the client left, the queue
        was full, a cache hit): its probe slot is free again."""
        if route == "probe" and self._probes_out > 0:
            self._probes_out -= 1

    def window(self) -> dict:
        """The window's numbers (normal-route requests), for status pages and tests."""
        now = self.clock()
        self._prune(now)
        normal = [s for s in self._window if s.route == "normal"]
        return {
            "state": self.state,
            "reason": self.reason,
            "samples": len(normal),
            "p95_latency_s": _finite(p95([s.latency_s for s in normal])),
            "p95_queue_wait_s": _finite(p95([s.queue_wait_s for s in normal])),
            "seconds_in_state": now - self._since,
            "cooldown_s": self.cooldown_s,
        }

    # -- transitions -----------------------------------------------------------------------------

    @property
    def cooldown_s(self) -> float:
        """The current cool-down: doubled for each reopening since the last close."""
        c = self.config
        longest = c.max_cooldown_s if c.max_cooldown_s is not None else 8 * c.cooldown_s
        return min(longest, c.cooldown_s * 2 ** min(self._reopened, 30))

    def _tick(self, now: float) -> None:
        if self._state != "closed" and now - self._active > self.config.window_s:
            return self._close(now)  # nothing asked or answered for a window: the load is gone
        if self._state == "open" and now - self._since >= self.cooldown_s:
            self._move("half_open", self.reason, now)

    def _prune(self, now: float) -> None:
        while self._window and now - self._window[0].t > self.config.window_s:
            self._window.popleft()

    def _breach(self) -> OpenReason | None:
        """Why the window (normal-route requests only) misses an SLO, or None."""
        c = self.config
        normal = [s for s in self._window if s.route == "normal"]
        if len(normal) < c.min_samples:
            return None
        if p95([s.latency_s for s in normal]) > c.latency_slo_s:
            return "latency"
        if c.queue_wait_slo_s is not None and p95([s.queue_wait_s for s in normal]) > (
            c.queue_wait_slo_s
        ):
            return "queue_wait"
        return None

    def _over(self, sample: Sample, ratio: float) -> OpenReason | None:
        """Which SLO, scaled by `ratio`, the sample misses (None: within both)."""
        c = self.config
        if sample.latency_s > ratio * c.latency_slo_s:
            return "latency"
        if c.queue_wait_slo_s is not None and sample.queue_wait_s > ratio * c.queue_wait_slo_s:
            return "queue_wait"
        return None

    def _judge_trial(self, sample: Sample, ok: bool) -> None:
        c, now = self.config, self.clock()
        if sample.route != "degraded":  # a probe, or a request that may not be degraded: both
            missed = "latency" if not ok else self._over(sample, 1.0)  # took the normal route
            if missed is None and self._over(sample, c.close_ratio) is not None:
                missed = self.reason or "latency"  # under the SLO, not by the margin: still open
            if missed is not None:
                return self._reopen(missed, now)
            self._probes_passed += 1
        self._trial.append(sample)
        if len(self._trial) < c.min_samples:
            return
        if self._probes_passed < c.probes:
            if self._probes_out == 0:  # the queue never emptied for a probe: load is still high
                self._reopen(self.reason or "latency", now)
            return
        ratio = c.close_ratio
        trial = Sample(
            now,
            p95([s.queue_wait_s for s in self._trial]),
            p95([s.latency_s for s in self._trial]),
            "normal",
        )
        missed = self._over(trial, ratio)
        if missed is not None:
            return self._reopen(missed, now)
        self._close(now)

    def _close(self, now: float) -> None:
        self._window.clear()  # the overload's samples must not reopen it at once
        self._reopened = 0
        self._move("closed", None, now)

    def _reopen(self, reason: OpenReason, now: float) -> None:
        self._reopened += 1
        self._move("open", reason, now)

    def _move(self, state: BreakerState, reason: OpenReason | None, now: float) -> None:
        self._state, self._since, self.reason = state, now, reason
        self._probes_out = self._probes_passed = 0
        self._trial = []
        if self.on_change is not None:
            self.on_change(state, reason)


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else x
