"""Fallback under load: the service's circuit breaker (difforge.serving.breaker) and the cheaper
route it switches degradable requests to.

A request is degradable when the service policy (`ServiceConfig.breaker.degrade`) and the request
(`"allow_degraded"`: true, false, or absent) agree:

    policy             allow_degraded: true   absent   false
    never              no                     no       no
    allowed            yes                    no       no
    always_when_open   yes                    yes      no

While the breaker is open a degradable request is re-resolved with the cheap route's settings by
the one request resolver (so its pixels are exactly those of a normal request with those
settings, same seed, same bytes) and answered with `X-Difforge-Degraded: steps=4` (plus
`sampler=...`, `model=<version>` when those change), a `degraded` record in the JSON body, the
PNG provenance and the audit log, and a count in difforge_degraded_requests_total{reason}.

The cheap route is the router's fast version when one is installed (a distilled student of
production: `difforge serve --fast PATH`, `await service.install(model, "fast")`, or with
`--registry` the production version's newest registered student; difforge.serving.router): the
request is re-resolved as if it had asked for `route: "fast"`, with the student's own sampling
defaults (`fast_steps` overrides its steps). Without one it is fewer steps on the routed version.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from difforge.pipeline import Plan, SampleRequest
from difforge.serving.breaker import (
    OPEN_REASONS,
    STATES,
    Breaker,
    BreakerConfig,
    BreakerState,
    OpenReason,
    Route,
)
from difforge.serving.metrics import ServiceMetrics
from difforge.serving.protocol import RequestInvalid
from difforge.serving.router import ModelVersion

if TYPE_CHECKING:
    from difforge.serving.engine import Job

HEADER = "X-Difforge-Degraded"


@dataclass(frozen=True)
class Degradation:
    """What a degraded request was given instead of what it asked for."""

    reason: OpenReason  # why the breaker was open
    requested_steps: int
    requested_sampler: str
    steps: int
    sampler: str
    version: str | None = None  # the fast version's id; None: the routed version

    def header(self) -> str:
        """The X-Difforge-Degraded value: `steps=4`, then `sampler=` / `model=` if they changed."""
        parts = [f"steps={self.steps}"]
        if self.sampler != self.requested_sampler:
            parts.append(f"sampler={self.sampler}")
        if self.version is not None:
            parts.append(f"model={self.version}")
        return "; ".join(parts)

    def describe(self) -> dict[str, Any]:
        return {
            "reason": self.reason,
            "requested_steps": self.requested_steps,
            "requested_sampler": self.requested_sampler,
            "steps": self.steps,
            "sampler": self.sampler,
            **({"model_version": self.version} if self.version is not None else {}),
        }


@dataclass(frozen=True)
class Choice:
    """A request's route: its (possibly re-resolved) plan, the fast version if it takes one, and
    the degradation record (None: normal route)."""

    route: Route
    plan: Plan
    degradation: Degradation | None = None
    version: ModelVersion | None = None  # the fast version, when the cheap route is one


class Fallback:
    """The breaker, the cheap route and their metrics.

    Args:
        config: the breaker's settings.
        metrics: the service's metrics (breaker state, degraded requests).
        fast: the router's fast version now (None: none installed).
        clock: monotonic seconds (tests pass a fake).
    """

    def __init__(
        self,
        config: BreakerConfig,
        metrics: ServiceMetrics,
        fast: Callable[[], ModelVersion | None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.metrics = metrics
        self._fast = fast
        self.breaker = Breaker(config, clock, on_change=self._changed)
        for reason in OPEN_REASONS:
            metrics.degraded.labels(reason)  # exported as 0 from the start
        for state in STATES:
            metrics.breaker_transitions.labels(state)
        self._publish(self.breaker.state)
        metrics.refreshers.append(lambda: self._publish(self.breaker.state))  # time moves it too

    def degradable(self, allow: bool | None) -> bool:
        """Whether the policy lets a request with this `allow_degraded` be degraded."""
        policy = self.config.degrade
        if policy == "never" or allow is False:
            return False
        return allow is True or policy == "always_when_open"

    def choose(
        self,
        req: SampleRequest,
        plan: Plan,
        resolve: Callable[[SampleRequest], Plan],
        queued: int = 0,
    ) -> Choice:
        """The route of a validated request; `resolve` is the service's resolver (its limits),
        `queued` the requests waiting for a sampler call (the breaker probes an empty queue)."""
        route = self.breaker.admit(self.degradable(req.allow_degraded), queued)
        if route != "degraded":
            self._publish(self.breaker.state)
            return Choice(route, plan)
        fast = self._fast()
        fast = fast if fast is not None and fast.ready else None
        if fast is not None:
            if plan.adapter is not None:
                return Choice("normal", plan)  # adapters are attached to the routed version only
            # as if it asked for the student: its own defaults (the request's steps, sampler and
            # knobs were chosen for production), unless the breaker config names them
            update: dict[str, Any] = {"route": "fast", "steps": self.config.fast_steps}
            update |= {"sampler": self.config.degraded_sampler, "options": {}}
        else:
            steps = self.config.degraded_steps
            sampler = self.config.degraded_sampler or plan.sampler
            if steps >= plan.steps and sampler == plan.sampler:
                return Choice("normal", plan)  # already as cheap as the cheap route
            update = {"steps": steps, "sampler": sampler}
            if sampler != plan.sampler:
                update["options"] = {}  # the requested sampler's knobs need not fit another one
        if plan.seed_drawn:  # keep the drawn seeds: the answer still names the seeds it used
            update |= {"seed": None, "seeds": list(plan.seeds)}
        try:
            cheap = replace(resolve(req.model_copy(update=update)), seed_drawn=plan.seed_drawn)
        except RequestInvalid:  # e.g. an edit whose strength leaves no step at that count
            return Choice("normal", plan)
        reason = self.breaker.reason or "latency"
        version = None if fast is None else fast.id
        self.metrics.degraded.labels(reason).inc()
        return Choice(
            route,
            cheap,
            Degradation(reason, plan.steps, plan.sampler, cheap.steps, cheap.sampler, version),
            fast,
        )

    def finish(self, choice: Choice, job: Job | None, ok: bool, measured: bool = True) -> None:
        """A routed request ended: measure it (`measured`: it queued and ran, or failed on the
        service's side) or only free its probe slot (cache hit, client gone, queue full)."""
        if job is None or not measured:
            self.breaker.release(choice.route)
        else:
            now = time.monotonic()
            started = job.started if job.started is not None else now
            self.breaker.record(choice.route, started - job.accepted, now - job.accepted, ok)
        self._publish(self.breaker.state)

    def status(self) -> dict[str, Any]:
        """The breaker and the cheap route, for GET /v1/models (the fast version itself is listed
        once, with the router's versions)."""
        fast = self._fast()
        return {
            **self.breaker.window(),
            "degrade": self.config.degrade,
            "degraded_steps": self.config.degraded_steps,
            "fast_model": None if fast is None else fast.id,
        }

    def _changed(self, state: BreakerState, reason: OpenReason | None) -> None:
        self.metrics.breaker_transitions.labels(state).inc()
        self._publish(state)

    def _publish(self, state: BreakerState) -> None:
        for s in STATES:
            self.metrics.breaker_state.labels(s).set(1.0 if s == state else 0.0)
