"""Serving from the model registry: the production version and the canary with its share of the
traffic, admin promotions and rollbacks, following changes made elsewhere, and automatic canary
rollback (`difforge serve --registry URL --name NAME`).

One rule holds every path: traffic moves only to a version that has been loaded from the registry
(every artifact's sha256 checked) and warmed up. Until then the router keeps what it serves, so a
tampered artifact, a failed load or a failed warm-up is reported (audit entry in the registry,
`problems` in GET /v1/admin/registry, `difforge_registry_events_total{event="load_failed"}`) while
the old version keeps answering. The admin bodies and error mapping: `difforge.serving.admin`;
the outcome windows a canary is judged on: `difforge.serving.outcomes`.

    POST /v1/admin/promote, /canary    load + verify -> registry (gates) -> warm -> route
    POST /v1/admin/rollback            registry -> load + verify -> warm -> route
    every `poll_s`                     revision changed? -> load + verify -> warm -> route
    a PostgreSQL change notification   the same, at once (difforge.serving.registry_notify)
    every `check_s`                    should_rollback(production window, canary window)?
                                       -> canary out of the router -> auto_rollback_canary
    every sync                         production's newest registered student (registry.students
                                       .fast_student) -> load + verify -> warm -> the fast version

Promotions load the version *before* asking the registry, so a version this service cannot load
never becomes an alias through it. Every change goes through `sync`, which makes the router match
`Registry.resolve(name)`; admin routes, polling and startup share it, under one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from difforge.pipeline import Model
from difforge.registry import Registry, RegistryError, Resolution, should_rollback
from difforge.registry.adapters import attach_registered
from difforge.registry.reports import latest_report
from difforge.registry.students import fast_student
from difforge.serving.access import Principal
from difforge.serving.admin import CanaryBody, PromoteBody, RollbackBody, registry_errors
from difforge.serving.config import RegistryFollow, ServiceConfig
from difforge.serving.engine import on_passing_thread
from difforge.serving.outcomes import OutcomeWindows
from difforge.serving.protocol import RequestInvalid, field_error
from difforge.serving.registry_notify import follow_notifications, notifies
from difforge.serving.router import ModelRouter, ModelVersion, check_compatible
from difforge.serving.service import Service, ServiceError

log = logging.getLogger("difforge.serving")

_MAX_RETRY_S = 3600.0  # longest wait between retries of a version that failed to load


@dataclass
class _Failure:
    """A version that failed to load or warm up, and when to try it again."""

    message: str
    attempts: int
    retry_at: float


def registry_version(version: ModelVersion | None) -> int | None:
    """The registry version number a served version was loaded as (None if not from a registry)."""
    return None if version is None else version.meta.get("registry_version")


class RegistrySource:
    """Drives a service's router from a registry model's production and canary aliases.

    Args:
        service: the service (its router's production came from `registry`, see `open_service`).
        registry: the registry.
        name: the registered model name.
    """

    def __init__(self, service: Service, registry: Registry, name: str):
        self.service, self.registry, self.name = service, registry, name
        self.follow: RegistryFollow = service.config.registry
        self.windows = OutcomeWindows(self.follow.window_s)
        service.outcome_observers.append(self.windows.observe)
        self.revision: int | None = None  # of the last resolution applied
        self.problems: dict[str, str] = {}  # alias -> why it is not served as the registry says
        self.events: deque[dict[str, Any]] = deque(maxlen=50)
        self._failed: dict[int, _Failure] = {}  # registry version -> its last failure
        self._failed_fast: dict[str, _Failure] = {}  # student ref ("name:vN") -> its last failure
        self._pending_rollback: tuple[int, str] | None = None  # decided, registry not yet told
        self._spare: ModelVersion | None = None  # the production replaced last, still warm
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        for event in ("install", "load_failed", "auto_rollback", "poll_error"):
            service.metrics.registry_events.labels(event)  # exported as 0 from the start
        self._publish()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Install the canary (if any), then poll and judge in the background."""
        try:
            await self.sync()
        except Exception as e:  # the registry may be down at start: production still serves
            self._event("poll_error", f"first sync failed: {e}")
        self._tasks = [
            asyncio.create_task(self._every(self.follow.poll_s, self.sync), name="difforge-follow")
        ]
        if self.follow.auto_rollback:
            task = asyncio.create_task(self._every(self.follow.check_s, self.check_canary))
            self._tasks.append(task)
        url = self.registry.config.url
        if self.follow.notify and notifies(url):  # PostgreSQL: sync the moment a change commits
            listen = follow_notifications(url, self.name, self.sync)
            self._tasks.append(asyncio.create_task(listen, name="difforge-registry-notify"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        await asyncio.to_thread(self.registry.close)

    async def _every(self, seconds: float, fn: Callable[[], Any]) -> None:
        while True:
            await asyncio.sleep(seconds)
            try:
                await fn()
            except Exception as e:  # never let a database hiccup stop the loop
                log.warning("registry %s: %s failed: %s", self.name, fn.__name__, e)
                self._event("poll_error", f"{fn.__name__}: {e}")

    # -- following the registry ------------------------------------------------------------------

    async def sync(self, *, force: bool = False) -> Resolution | None:
        """Make the router serve what `registry.resolve(name)` says, if it changed.

        Args:
            force: apply even if the revision is unchanged, and retry failed versions now.

        Returns:
            The resolution applied, or None when nothing had changed.
        """
        async with self._lock:
            return await self._sync_locked(force=force)

    async def _sync_locked(
        self, *, force: bool = False, preloaded: dict[int, Model] | None = None
    ) -> Resolution | None:
        res = await asyncio.to_thread(self.registry.resolve, self.name)
        changed = force or res.revision != self.revision or self._retry_due(res)
        if changed:
            await self._apply(res, force, preloaded or {})
            self.revision = res.revision
        await self._sync_fast(force)  # a student registers under its own name: check each time
        return res if changed else None

    async def _sync_fast(self, force: bool) -> None:
        """Serve production's newest registered student as the fast version (none: remove it)."""
        info = await asyncio.to_thread(fast_student, self.registry, self.name)
        fast = self.service.router.fast
        if info is None:
            self.problems.pop("fast", None)
            if fast is not None:
                self.service.remove_fast()
                self._event("install", f"no fast version: no student of {self.name} production")
            return
        if fast is not None and (fast.meta.get("registry_name"), registry_version(fast)) == (
            info.name,
            info.version,
        ):
            return
        failure = self._failed_fast.get(info.ref)
        if failure is not None and not force and failure.retry_at > time.monotonic():
            self.problems["fast"] = failure.message
            return
        try:
            model = await self.service.engine.call(
                self.registry.load_version, info.name, info.version
            )
            meta = {"registry_name": info.name, "registry_version": info.version}
            version = await self.service.install(ModelVersion(model, meta=meta), "fast")
        except Exception as e:  # e.g. no student of the production this service still serves
            message = f"not serving {info.ref} as the fast version: {e}"
            attempts = 1 if failure is None else failure.attempts + 1
            delay = min(_MAX_RETRY_S, self.follow.retry_failed_s * 2 ** min(attempts - 1, 20))
            self._failed_fast[info.ref] = _Failure(message, attempts, time.monotonic() + delay)
            self.problems["fast"] = message
            log.error("registry %s: %s", self.name, message)
            self._event("load_failed", message)
            return
        self._failed_fast.pop(info.ref, None)
        self.problems.pop("fast", None)
        self._event("install", f"fast is {info.ref} ({version.id})")
        self._publish()

    def _retry_due(self, res: Resolution) -> bool:
        now = time.monotonic()
        wanted = {v.version for v in (res.production, res.canary) if v is not None}
        return any(f.retry_at <= now for v, f in self._failed.items() if v in wanted)

    async def _apply(self, res: Resolution, force: bool, preloaded: dict[int, Model]) -> None:
        """Load and warm what is new, then move traffic in one step (no await in between)."""
        router, problems = self.service.router, {}
        await self._refresh_adapters(problems)  # versions held already; new ones load theirs
        want_prod = None if res.production is None else res.production.version
        want_can = None if res.canary is None else res.canary.version
        if self._pending_rollback and want_can == self._pending_rollback[0]:
            want_can = None  # demoted here; the registry is told on the next check
        prod = None
        if want_prod is None:
            problems["production"] = f"{self.name} has no production version in the registry"
        elif want_prod != registry_version(router.production):
            prod = await self._prepare(want_prod, force, preloaded, problems, "production")
        canary, share = router.canary, router.canary_share
        if want_can is None:
            canary = None
        elif want_can == registry_version(canary):
            share = res.canary_share
        elif ready := await self._prepare(want_can, force, preloaded, problems, "canary"):
            canary, share = ready, res.canary_share
        # (a canary that failed to load leaves the old one, at its old share, in place)
        if prod is not None and canary is prod:
            canary = None  # the canary graduated to production
        # From here on nothing awaits: new requests see the whole change or none of it.
        if prod is not None:
            old = router.production
            await self.service.install(prod, "production")  # warm already: no await inside
            self._spare = old if self.follow.keep_previous and old is not canary else None
            self._event("install", f"production is v{want_prod} ({prod.id})")
        if canary is None:
            if router.canary is not None:
                self.service.remove_canary()
        elif canary is not router.canary or share != router.canary_share:
            if canary is not router.canary:
                self.windows.reset(canary.id)
                self._event("install", f"canary is v{want_can} ({canary.id}) at {share:.0%}")
            await self.service.install(canary, "canary", share)
        self.problems = problems
        self._publish()

    async def _refresh_adapters(self, problems: dict[str, str]) -> None:
        """Attach the adapters pushed for versions already served (a push is a new revision)."""
        held = [*self.service.router.versions(), ("spare", self._spare)]
        for role, version in held:
            number = registry_version(version)
            if number is None or role == "fast":  # a student is registered under its own name
                continue
            try:
                added = await self.service.engine.call(
                    attach_registered, self.registry, version.model, self.name, number
                )
            except Exception as e:  # the version keeps serving the adapters it had
                message = f"not serving new adapters of {self.name} v{number}: {e}"
                problems[f"{role}_adapters"] = message
                self._event("load_failed", message)
                continue
            if added:
                self._event("install", f"{role} v{number} serves adapters {', '.join(added)}")

    async def _prepare(
        self,
        number: int,
        force: bool,
        preloaded: dict[int, Model],
        problems: dict[str, str],
        alias: str,
    ) -> ModelVersion | None:
        """Registry version `number`, loaded, verified and warm; None (and a problem) if not."""
        router = self.service.router
        for held in (router.production, router.canary, self._spare):
            if registry_version(held) == number:
                return held
        failure = self._failed.get(number)
        if failure is not None and not force and failure.retry_at > time.monotonic():
            problems[alias] = failure.message
            return None
        try:
            model = preloaded.get(number) or await self.service.engine.call(
                load_with_adapters, self.registry, self.name, number
            )
            version = self._version(model, number)
            check_compatible(router.production.model, model)
            await self.service.warm(version)
        except Exception as e:
            message = f"not serving {self.name} v{number} as {alias}: {e}"
            attempts = 1 if failure is None else failure.attempts + 1
            delay = min(_MAX_RETRY_S, self.follow.retry_failed_s * 2 ** min(attempts - 1, 20))
            self._failed[number] = _Failure(message, attempts, time.monotonic() + delay)
            problems[alias] = message
            log.error("registry %s: %s", self.name, message)
            self._event("load_failed", message)
            return None
        self._failed.pop(number, None)
        return version

    def _version(self, model: Model, number: int) -> ModelVersion:
        return ModelVersion(model, meta={"registry_name": self.name, "registry_version": number})

    async def _load_checked(self, number: int) -> Model:
        """A version loaded and verified before the registry is changed to point at it."""
        router = self.service.router
        for held in (router.production, router.canary, self._spare):
            if registry_version(held) == number:
                return held.model
        model = await self.service.engine.call(load_with_adapters, self.registry, self.name, number)
        check_compatible(router.production.model, model)
        return model

    # -- automatic canary rollback ---------------------------------------------------------------

    async def check_canary(self) -> str | None:
        """Judge the canary's window against production's; demote it if it does worse.

        Returns:
            The reason it was rolled back, or None.
        """
        if self._pending_rollback is not None:  # decided earlier; the registry was unreachable
            await self._tell_registry(*self._pending_rollback)
        router = self.service.router
        canary, prod = router.canary, router.production
        if canary is None:
            return None
        m = self.follow.margins
        reason = should_rollback(self.windows.stats(prod.id), self.windows.stats(canary.id), m)
        if reason is None:
            return None
        async with self._lock:
            if router.canary is not canary:  # changed while we waited for the lock
                return None
            self.service.remove_canary()  # traffic first: the registry call may be slow
            self.windows.reset(canary.id)
            number = registry_version(canary)
            log.warning("registry %s: canary v%s rolled back: %s", self.name, number, reason)
            self._event("auto_rollback", f"canary v{number} ({canary.id}) rolled back: {reason}")
            self._pending_rollback = (number, reason)
            await self._tell_registry(number, reason)
            self._publish()
        return reason

    async def _tell_registry(self, number: int, reason: str) -> None:
        try:
            await asyncio.to_thread(
                self.registry.auto_rollback_canary, self.name, reason, expected_version=number
            )
        except Exception as e:
            log.error("registry %s: could not record the canary rollback: %s", self.name, e)
            self._event("poll_error", f"auto_rollback_canary: {e}")
            return
        self._pending_rollback = None

    # -- admin operations ------------------------------------------------------------------------

    def _as(self, who: Principal) -> Registry:
        """The registry, naming the admin key in the audit entries it writes."""
        reg = copy.copy(self.registry)  # shares the engine and store; only the actor differs
        reg.actor = f"{self.registry.actor} (serving admin key {who.key_id})"
        return reg

    async def promote(self, body: PromoteBody, who: Principal) -> dict[str, Any]:
        """Load and verify a version, promote it in the registry (gates), warm it, route to it."""
        reg = self._as(who)
        with registry_errors():
            async with self._lock:
                info = await asyncio.to_thread(reg.get, self.name, body.version)
                model = await self._load_checked(info.version)
                promotion = await asyncio.to_thread(
                    reg.promote,
                    self.name,
                    info.version,
                    body.to,
                    gates=body.gates,
                    percent=body.percent,
                )
                await self._sync_locked(force=True, preloaded={info.version: model})
                self._require_served(body.to, info.version)
        return {
            "promoted": {
                "version": info.version,
                "to": body.to,
                "previous": promotion.previous,
                "changed": promotion.changed,
                "gates": [g.to_dict() for g in promotion.gates],
            },
            **self.status(),
        }

    async def rollback(self, body: RollbackBody, who: Principal) -> dict[str, Any]:
        """Point the alias back at its previous version in the registry, then serve that."""
        reg = self._as(who)
        with registry_errors():
            async with self._lock:
                info = await asyncio.to_thread(reg.rollback, self.name, body.alias, body.reason)
                await self._sync_locked(force=True)
                self._require_served(body.alias, info.version)
        return {"rolled_back": {"alias": body.alias, "version": info.version}, **self.status()}

    async def set_canary(self, body: CanaryBody, who: Principal) -> dict[str, Any]:
        """A new canary version at `percent` (gated, like promote), or the current one's percent."""
        if body.version is not None:
            promote = PromoteBody(
                version=body.version, to="canary", gates=body.gates, percent=body.percent
            )
            return await self.promote(promote, who)
        if body.gates is not None:
            raise RequestInvalid([field_error("gates", "gates apply with a version only")])
        reg = self._as(who)
        with registry_errors():
            async with self._lock:
                await asyncio.to_thread(reg.set_canary_percent, self.name, body.percent)
                await self._sync_locked(force=True)
        return self.status()

    def _require_served(self, alias: str, number: int) -> None:
        served = (
            self.service.router.production if alias == "production" else self.service.router.canary
        )
        if registry_version(served) != number:
            why = self.problems.get(alias, "unknown")
            raise ServiceError(
                "internal",
                f"the registry now has {self.name} v{number} as {alias}, but this service "
                f"still serves the previous version: {why}",
            )

    # -- reporting -------------------------------------------------------------------------------

    def _event(self, kind: str, message: str) -> None:
        self.service.metrics.registry_events.labels(kind).inc()
        self.events.append({"time": time.time(), "event": kind, "message": message})

    def _publish(self) -> None:
        served = [
            (role, v.id, registry_version(v))
            for role, v in self.service.router.versions()
            if registry_version(v) is not None and role != "fast"  # the student's own name
        ]
        self.service.metrics.set_registry_versions(self.name, served)

    def status(self) -> dict[str, Any]:
        """What GET /v1/admin/registry answers: what is served, what failed, recent events."""
        router = self.service.router
        return {
            "name": self.name,
            "revision": self.revision,
            "serving": [
                {
                    "role": role,
                    **({"registry_name": v.meta.get("registry_name")} if role == "fast" else {}),
                    "registry_version": registry_version(v),
                    "version": v.id,
                    "adapters": [a.describe() for a in v.model.adapters.values()],
                }
                for role, v in router.versions()
            ],
            "canary_share": router.canary_share,
            "follow": {
                "poll_s": self.follow.poll_s,
                "notify": self.follow.notify and notifies(self.registry.config.url),
            },
            "shared_state": self.service.state.backend,  # idempotency + rate limits
            "problems": dict(self.problems),
            "events": list(self.events)[-10:],
        }


def load_with_adapters(registry: Registry, name: str, number: int) -> Model:
    """Registry version `number` of `name` (every blob re-hashed) with the latest version of each
    adapter pushed for it attached (difforge.registry.adapters); requests name them."""
    model = registry.load_version(name, number)
    attach_registered(registry, model, name, number)
    return model


def open_service(
    url: str, name: str, config: ServiceConfig, artifacts: str | None = None
) -> tuple[Service, RegistrySource]:
    """A Service whose production is registry model `name`'s production version, and its source.

    The canary (if any) and production's newest registered student (the fast version, if any)
    are installed when the source starts (after the service's warm-up).

    Raises:
        RegistryError: no such model, or it has no production version.
        ArtifactIntegrityError: production's artifacts fail their sha256 check (audited).
    """
    registry = Registry(url, artifacts)
    try:
        res = registry.resolve(name)
        if res.production is None:
            raise RegistryError(
                f"{name} has no production version to serve; promote one first "
                f"(difforge registry promote {name} VERSION)"
            )
        number = res.production.version
        model = on_passing_thread(load_with_adapters, registry, name, number)
    except BaseException:
        registry.close()
        raise
    meta = {"registry_name": name, "registry_version": number}
    try:
        service = Service(config, ModelRouter(ModelVersion(model, meta=meta)), registry_url=url)
    except BaseException:
        registry.close()
        raise
    if service.drift is not None:  # drift is measured against each version's evaluation report
        service.drift.report_for = lambda v: latest_report(
            registry, v.meta["registry_name"], v.meta["registry_version"]
        )
    return service, RegistrySource(service, registry, name)
