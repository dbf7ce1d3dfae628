"""The service: one object that owns the router, engine, access control, rate limiter, idempotency
store, audit log and metrics, and carries a generation request through them.

POST /v1/generate, in order (each step costs less than the next, so cheap rejections stay cheap):
authorize (unauthorized/forbidden) -> rate limit (rate_limited) -> read the body
(body_too_large) -> idempotency claim (replay, idempotency_conflict, idempotency_mismatch) -> parse
and validate (validation) -> route to a model version -> result cache (a hit skips to encode;
difforge.serving.cache) -> enqueue (queue_full) -> wait for the images, the deadline (deadline) or
a disconnect (disconnect) -> output filters (difforge.serving.review: pass, hold for review with
a 202, or refuse: output_refused) -> encode -> audit -> answer.

The service knows nothing of HTTP status codes: it raises ServiceError with a reason, and the app
(difforge.serving.app.HTTP_STATUS) maps reasons to statuses; the audit log's http_status comes from
that mapping too (`status_of`, set by create_app).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import torch

from difforge.core.errors import DifforgeError
from difforge.pipeline import Model
from difforge.pipeline.conditioning import signature
from difforge.serving.access import AccessControl, AccessDenied, Principal
from difforge.serving.audit import AuditEntry, AuditLog
from difforge.serving.batching import BatchKey, BatchPlan, Row, sample_rows
from difforge.serving.cache import CachedResult, CacheKey, ResultCache, result_key
from difforge.serving.config import ServiceConfig
from difforge.serving.drift import DriftMonitor
from difforge.serving.encode import (
    encode_images,
    json_body,
    pixels_sha256,
    series_csv_body,
    series_json_body,
)
from difforge.serving.engine import (
    Engine,
    Job,
    JobFailed,
    NonFiniteOutput,
    QueueFull,
    finite_rows,
)
from difforge.serving.fallback import HEADER as DEGRADED_HEADER
from difforge.serving.fallback import Choice, Fallback
from difforge.serving.idempotency import IdempotencyConflict, StoredResponse
from difforge.serving.invariance import choose_plan, serving_model
from difforge.serving.metrics import VERSION_FAILURES, ServiceMetrics
from difforge.serving.protocol import (
    GenerateRequest,
    Plan,
    RequestInvalid,
    field_error,
    parse_body,
    resolve,
)
from difforge.serving.review import Screen, ScreenOutcome
from difforge.serving.router import ModelRouter, ModelVersion, Role
from difforge.serving.shared_state import SharedState, StateUnavailable

log = logging.getLogger("difforge.serving")

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{8,64}$")
_VERSION_FAILURES = frozenset(VERSION_FAILURES)  # they count against the version that served
# refusals before any work: they give the rate-limit token back
_REFUSED_BEFORE_WORK = frozenset({"not_ready", "queue_full", "shutdown"})
Receive = Callable[[], Awaitable[dict]]


class ServiceError(DifforgeError):
    """A request that ends without images.

    Attributes:
        reason: why, one of metrics.ERROR_REASONS (the app maps it to an HTTP status).
        detail: what the client is told: a message or field-level errors.
        retry_after: seconds after which a retry may succeed, if it may.
        request_id: the request's id, once it has one.
        role: the role of the version it was routed to, once it was (a metric label).
    """

    def __init__(
        self,
        reason: str,
        detail: Any,
        *,
        retry_after: float | None = None,
        request_id: str | None = None,
    ):
        self.reason, self.detail = reason, detail
        self.retry_after, self.request_id = retry_after, request_id
        self.role: str | None = None
        super().__init__(str(detail))


def _no_status(reason: str) -> int:
    return 0  # not answered over HTTP (a service driven without the app)


@dataclass
class GenerateCall:
    """What the route hands the service: who asks, the raw body and the relevant headers."""

    principal: Principal
    body: bytes
    request_id: str | None = None  # X-Request-Id, optional
    idempotency_key: str | None = None
    receive: Receive | None = None  # the ASGI receive channel, to notice a disconnect
    accepted: float = field(default_factory=time.monotonic)


class Service:
    """Everything behind the routes.

    Args:
        config: the service configuration.
        router: the model versions (they are warmed up by `start`).
        registry_url: the registry followed, if any (default database of `config.state`).
    """

    def __init__(self, config: ServiceConfig, router: ModelRouter, registry_url: str | None = None):
        self.config = config
        self.router = router
        self.metrics = ServiceMetrics()
        self.engine = Engine(config, self.metrics)
        self.access = AccessControl(config)
        self.detector = None  # an anomaly detector over the production model (serving.anomaly)
        # rate limits and Idempotency-Key records: in memory, or shared by replicas in a database
        self.state = SharedState(config, registry_url)
        self.limiter, self.idempotency = self.state.limiter, self.state.idempotency
        self.audit = AuditLog(config.audit_db)
        # the breaker and its cheap route (the router's fast version, when one is installed)
        self.fallback = Fallback(config.breaker, self.metrics, lambda: self.router.fast)
        rc = config.result_cache
        self.cache = ResultCache(
            rc.max_bytes,
            rc.ttl_s,
            on_evict=lambda why: self.metrics.cache_evictions.labels(why).inc(),
        )
        # observer(job, ok, latency_s) for each request that succeeds, fails inside or misses its
        # deadline: the per-version windows of canary rollback (difforge.serving.registry_source)
        self.outcome_observers: list[Callable[[Job, bool, float], None]] = []
        # outcome reason -> the HTTP status recorded in the audit log (set by the app)
        self.status_of: Callable[[str], int] = _no_status
        # the output filter stage and review queue (difforge.serving.review); off without filters
        self.screen = Screen(self)
        self._warming: asyncio.Task | None = None
        self._threads_before: int | None = None
        self._publish_models()
        self.drift: DriftMonitor | None = None  # output and input drift (serving.drift)
        if config.drift.enabled:
            served = lambda: [v for _, v in self.router.versions()]  # noqa: E731
            self.drift = DriftMonitor(config.drift, self.metrics, served)
            self.outcome_observers.append(self.drift.observe)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the engine and warm every version in the background (ready when done)."""
        await self.engine.start()
        if self.config.torch_threads:
            # Set on the sampler thread: that thread's OpenMP team is what runs the batches.
            self._threads_before = await self.engine.call(_set_threads, self.config.torch_threads)
        versions = [v for _, v in self.router.versions() if not v.ready]
        self._publish_models()
        self._warming = asyncio.create_task(self._warm_all(versions), name="difforge-warmup")
        if self.drift is not None:
            self.drift.start(self.engine)

    async def _warm_all(self, versions: list[ModelVersion]) -> None:
        for version in versions:
            try:
                await self.warm(version)
            except Exception:
                log.exception("warm-up of model version %s failed", version.id)
                raise

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Block until every version is warmed (raises if warm-up failed or took too long)."""
        if self._warming is not None:
            await asyncio.wait_for(asyncio.shield(self._warming), timeout)

    async def stop(self) -> None:
        if self._warming is not None and not self._warming.done():
            self._warming.cancel()
        if self.drift is not None:
            await self.drift.stop()
        self.engine.cancel_all("shutdown")
        if self._threads_before is not None:  # torch's thread count is process state: restore it
            await self.engine.call(_set_threads, self._threads_before)
        await self.engine.stop()
        self.audit.close()
        self.state.close()

    @property
    def ready(self) -> bool:
        return self.router.production.ready and self._warming is not None and self._warming.done()

    async def warm(self, version: ModelVersion) -> BatchPlan:
        """Run the version once at every call shape and choose its batch plan (on the sampler thread)."""
        t0 = time.perf_counter()
        plan = await self.engine.call(self._warm_sync, version)
        version.plan, version.warmup_seconds = plan, time.perf_counter() - t0
        log.info("model %s (%s) ready: batching %s", version.name, version.id, plan.mode)
        return plan

    def _warm_sync(self, version: ModelVersion) -> BatchPlan:
        model = version.model = serving_model(version.model, self.config.batch_invariance)
        cond = model.spec.resolve({}, 1)[0]  # the spec's default conditioning
        keys = [self._key(version, model.sampling.sampler, self.config.warmup_steps, False, ())]
        if model.spec.guidable:
            keys.append(self._key(version, keys[0].sampler, self.config.warmup_steps, True, ()))
        mode, chunk = self.config.batch_invariance, self.config.chunk_rows
        probe_plan = BatchPlan(
            mode, self.config.limits.max_batch_images, chunk_rows=chunk if mode == "chunk" else None
        )
        for key in keys:  # the first call at a shape pays one-off kernel set-up; do it now
            rows = [Row(seed=0, cond=cond, guidance=2.0 if key.guided else 1.0)]
            pad = probe_plan.micro(key.guided)
            x, _ = sample_rows(model, key, rows, pad_to=pad, chunk_rows=probe_plan.chunk_rows)
            if not all(finite_rows(x)):  # a broken version must never become ready
                raise NonFiniteOutput(
                    f"refusing model {version.name} ({version.id}): warm-up sample at "
                    f"{key.sampler}, {key.steps} steps, guided={key.guided} is non-finite"
                )
        return choose_plan(model, keys, mode, probe_plan.max_rows, probe_plan.chunk_rows)

    async def install(
        self, model: Model | ModelVersion, role: Role = "production", share: float = 0.0
    ) -> ModelVersion:
        """Warm `model` (unless it is a version already warm), then make it production, the
        canary (with `share` of the traffic) or the fast version (a student of production that
        answers `route: "fast"` and the breaker's cheap route; router.check_fast).

        Requests already accepted finish on the version they were routed to; none fails.
        """
        version = model if isinstance(model, ModelVersion) else ModelVersion(model)
        if not version.ready:
            await self.warm(version)
        if role == "production":
            self.router.swap(version)
        elif role == "fast":
            self.router.set_fast(version)
        else:
            self.router.set_canary(version, share)
        self._publish_models()
        return version

    def remove_canary(self) -> ModelVersion | None:
        """Send all traffic to production; returns the canary (it finishes its requests)."""
        canary = self.router.canary
        self.router.set_canary(None)
        self._publish_models()
        return canary

    def remove_fast(self) -> ModelVersion | None:
        """Remove the fast version (it finishes its requests); the breaker falls back to fewer
        steps and `route: "fast"` requests are refused."""
        fast = self.router.fast
        self.router.set_fast(None)
        self._publish_models()
        return fast

    def _publish_models(self) -> None:
        self.metrics.set_models([(v.name, v.id, role) for role, v in self.router.versions()])

    # -- generate --------------------------------------------------------------------------------

    async def generate(self, call: GenerateCall) -> StoredResponse:
        """Run one POST /v1/generate; raises ServiceError for every outcome without images."""
        try:
            return await self._generate_counted(call)
        except StateUnavailable as e:  # the shared database is away: retry later, elsewhere
            raise ServiceError("not_ready", str(e), retry_after=1.0) from None

    async def _generate_counted(self, call: GenerateCall) -> StoredResponse:
        principal = call.principal
        wait = await self.state.call(self.limiter.acquire, principal.key_id)
        if wait is not None:
            raise ServiceError("rate_limited", "rate limit exceeded for this key", retry_after=wait)
        try:
            return await self._generate_limited(call)
        except ServiceError as e:
            if e.reason in _REFUSED_BEFORE_WORK:  # the service's state, not the client's use
                await self.state.call(self.limiter.refund, principal.key_id)
            raise

    async def _generate_limited(self, call: GenerateCall) -> StoredResponse:
        principal = call.principal
        request_id = self._request_id(call.request_id)
        idem = call.idempotency_key
        if idem:
            try:
                stored = await self.state.call(
                    self.idempotency.claim, principal.key_id, idem, call.body
                )
            except IdempotencyConflict as e:
                # still running: a retry after it finishes gets the stored answer
                retry = self.engine.retry_after_s() if e.reason == "idempotency_conflict" else None
                raise ServiceError(e.reason, str(e), retry_after=retry) from None
            if stored is not None:
                return StoredResponse(
                    stored.body,
                    stored.media_type,
                    {**stored.headers, "Idempotent-Replayed": "true"},
                    stored.status,
                )
        if not idem:
            return await self._generate(call, request_id)
        try:
            async with self.state.holding(principal.key_id, idem):  # renews a database claim
                response = await self._generate(call, request_id)
        except BaseException:
            with contextlib.suppress(StateUnavailable):  # then the claim's lease runs out
                await self.state.call(self.idempotency.release, principal.key_id, idem)
            raise
        with contextlib.suppress(StateUnavailable):  # answered, not stored: the lease runs out
            await self.state.call(self.idempotency.complete, principal.key_id, idem, response)
        return response

    def _request_id(self, given: str | None) -> str:
        if given is None:
            return uuid.uuid4().hex
        if not _REQUEST_ID.match(given):
            msg = "8-64 of A-Z a-z 0-9 . _ -"
            loc = ["header", "x-request-id"]
            raise ServiceError("validation", [{"loc": loc, "msg": msg, "type": "value_error"}])
        if given in self.engine.jobs:
            raise ServiceError(
                "idempotency_conflict",
                "a request with this X-Request-Id is in progress",
                retry_after=self.engine.retry_after_s(),
            )
        return given

    async def _generate(self, call: GenerateCall, request_id: str) -> StoredResponse:
        req, plan = self._parse(call, request_id)  # first: an invalid request is "validation"
        if not self.ready:
            raise ServiceError("not_ready", "the model is warming up", retry_after=1.0)
        # Routing key: the same API key and seed always reach the same version (canary share).
        key = f"{call.principal.key_id}:{plan.seeds[0]}"
        role, version = self.router.route(key, plan.adapter, plan.route)
        if plan.route == "fast":  # asked for the student: the breaker's cheap route stays out
            choice = Choice("normal", plan)
        else:
            choice = self.fallback.choose(req, plan, self._resolve, self.engine.depth)
        if choice.version is not None:  # the cheap route is the fast version
            role, version = "fast", choice.version
        self.metrics.routed.labels(role).inc()
        job = self._job(request_id, version, role, choice.plan, call.accepted)
        job.key_id = call.principal.key_id
        job.degraded = choice.degradation
        measured, ok = False, False
        try:
            response, measured = await self._run_job(call, job, choice)
            ok = True
            return response
        except ServiceError as e:
            e.role = role
            measured = e.reason in _VERSION_FAILURES  # the load's doing, not the client's
            raise
        finally:
            self.fallback.finish(choice, job, ok, measured)

    async def _run_job(
        self, call: GenerateCall, job: Job, choice: Choice
    ) -> tuple[StoredResponse, bool]:
        """Cache, queue, wait, answer; (the response, whether it ran: a cache hit did not)."""
        plan, version = choice.plan, job.version
        cache_key = self._cache_key(call, version, plan)
        if cache_key is not None:
            hit = self.cache.get(cache_key)
            (self.metrics.cache_hits if hit else self.metrics.cache_misses).inc()
            if hit is not None:  # no sampler call: the stored pixels, encoded for this request
                job.images, job.nfe, job.call_images = list(hit.images), hit.nfe, [*hit.call_images]
                return await self.screen.answer(call, job, plan, "hit"), False
        try:
            future = self.engine.submit(job)
        except QueueFull as e:
            raise ServiceError(
                "queue_full", "the queue is full", retry_after=e.retry_after
            ) from None
        try:
            await self._wait(job, future, call, plan)
        except ServiceError as e:
            if e.reason in _VERSION_FAILURES:
                self._outcome(job, False)
            raise
        if cache_key is not None:
            result = CachedResult(tuple(job.images), job.nfe, tuple(job.call_images))
            self.cache.put(cache_key, result)
            self.metrics.cache_bytes.set(self.cache.nbytes)
        self._outcome(job, True)  # the version did its work, whatever the filters decide
        cache = None if cache_key is None else "miss"
        return await self.screen.answer(call, job, plan, cache), True

    def _cache_key(self, call: GenerateCall, version: ModelVersion, plan: Plan) -> CacheKey | None:
        """The request's result cache key; None when the cache is off, its seed was drawn or its
        version batches without invariance (its pixels then depend on the call they shared)."""
        invariant = version.plan is not None and version.plan.invariant
        if not self.cache.enabled or plan.seed_drawn or not invariant:
            return None
        tenant = call.principal.key_id if self.config.result_cache.per_tenant else ""
        params = plan.params()
        if plan.adapter is not None:  # a name may be attached again with other weights
            params["adapter"] = version.model.adapters[plan.adapter].describe()
        return result_key(tenant, version.id, params)

    def _outcome(self, job: Job, ok: bool) -> None:
        latency = time.monotonic() - job.accepted
        for observe in self.outcome_observers:
            observe(job, ok, latency)

    def _plan(self, call: GenerateCall, request_id: str) -> Plan:
        return self._parse(call, request_id)[1]

    def _parse(self, call: GenerateCall, request_id: str) -> tuple[GenerateRequest, Plan]:
        """Parse and validate the body against the limits and the production model (versions
        served side by side accept the same requests; see router.check_compatible); the request
        is kept for the breaker's cheap route (it re-resolves it)."""
        try:
            req = parse_body(call.body, self.config.limits)
            return req, self._resolve(req)
        except RequestInvalid as e:
            self._audit(call, request_id, "invalid", e.reason, {"errors": e.errors}, None)
            raise ServiceError(e.reason, e.errors, request_id=request_id) from None

    def _resolve(self, req: GenerateRequest) -> Plan:
        """The one resolver under this service's limits (RequestInvalid if `req` breaks one)."""
        model = self.router.model_for(req.route)  # "fast": the student's defaults
        if model is None:
            raise RequestInvalid([field_error("route", "no fast route is served", "choice")])
        return resolve(
            req,
            self.config.limits,
            model,
            default_deadline_s=self.config.default_deadline_s,
            max_deadline_s=self.config.max_deadline_s,
        )

    def _key(
        self, version: ModelVersion, sampler: str, steps: int, guided: bool, options, cond=(),
        grid: str | None = None,
    ) -> BatchKey:  # fmt: skip
        m = version.model  # grid: the request's (its plan's), else the model's default
        return BatchKey(
            version.id, sampler, steps, grid or m.sampling.grid, m.image_shape, guided, options,
            cond,
        )  # fmt: skip

    def _job(
        self, request_id: str, version: ModelVersion, role: str, plan: Plan, accepted: float
    ) -> Job:
        unconds = plan.uncond_rows or [None] * len(plan.rows)
        edits = plan.edit.rows if plan.edit is not None else [None] * plan.n
        rows = [
            Row(seed=s, cond=c, guidance=plan.guidance, uncond=u, edit=e)
            for s, c, u, e in zip(plan.seeds, plan.rows, unconds, edits, strict=True)
        ]
        deadline = None if plan.deadline_s is None else accepted + plan.deadline_s
        sig = signature(plan.rows[0]) if plan.rows and len(plan.rows[0]) else ()
        key = self._key(
            version, plan.sampler, plan.steps, plan.guided, plan.options, sig, plan.grid
        )
        if plan.edit is not None or plan.adapter is not None:
            edit = None if plan.edit is None else plan.edit.settings
            key = replace(key, edit=edit, adapter=plan.adapter)
        return Job(request_id, version, role, key, rows, deadline=deadline, accepted=accepted)

    async def _wait(self, job: Job, future: asyncio.Future, call: GenerateCall, plan: Plan) -> None:
        """Until the images are done; cancels the job on deadline, disconnect or task cancel."""
        watcher = asyncio.ensure_future(_disconnected(call.receive)) if call.receive else None
        timeout = None if job.deadline is None else max(0.0, job.deadline - time.monotonic())
        try:
            waiting = {future} if watcher is None else {future, watcher}
            done, _ = await asyncio.wait(
                waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:  # the request task itself was cancelled: the client left
            self._cancel(job, call, plan, "disconnect")
            raise
        finally:
            if watcher is not None:
                watcher.cancel()
        if future in done and not future.cancelled():
            exc = future.exception()
            if exc is None:
                return
            rid = job.request_id
            if isinstance(exc, NonFiniteOutput):
                self._audit(call, rid, "non_finite", "non_finite", plan.params(), job)
                detail = "the model produced non-finite values (NaN or inf); no image returned"
                raise ServiceError("non_finite", detail, request_id=rid) from exc
            self._audit(call, rid, "error", "internal", plan.params(), job)
            raise ServiceError("internal", "internal error", request_id=rid) from exc
        reason = "disconnect" if watcher is not None and watcher in done else "deadline"
        raise self._cancel(job, call, plan, job.cancel_reason or reason)

    def _cancel(self, job: Job, call: GenerateCall, plan: Plan, reason: str) -> ServiceError:
        """Cancel `job` (the engine drops or stops it), audit it, and return the error to answer."""
        job.cancel(reason)
        self.engine.wake()
        if reason == "shutdown":
            return ServiceError("shutdown", "the service is shutting down", retry_after=5.0)
        outcome = "deadline_exceeded" if reason == "deadline" else "cancelled"
        self._audit(call, job.request_id, outcome, reason, plan.params(), job)
        msg = f"request cancelled: {reason}"
        return ServiceError(reason, msg, request_id=job.request_id)

    def _respond(
        self,
        call: GenerateCall,
        job: Job,
        plan: Plan,
        cache: str | None = None,
        screened: ScreenOutcome | None = None,
    ) -> StoredResponse:
        """Encode the job's images; `cache` ("hit" or "miss", None when off) becomes X-Cache;
        `screened`: the filter stage's decisions (provenance) and outcome (the audit status)."""
        images = [img for img in job.images if img is not None]
        digest = pixels_sha256(images)
        model = job.version.model
        common = {
            "model": model.name,
            "model_sha256": model.sha256,
            "model_version": job.version.id,
            "sampler": plan.sampler,
            "steps": plan.steps,
            "guidance": plan.guidance,
            "grid": plan.grid,
            "options": dict(plan.options),
            **({"adapter": model.adapters[plan.adapter].describe()} if plan.adapter else {}),
            **({"degraded": job.degraded.describe()} if job.degraded else {}),
            "request_id": job.request_id,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "synthetic": True,
            "software": "difforge",
        }
        headers = {
            "X-Request-Id": job.request_id,
            "X-Output-SHA256": digest,
            "X-Model-Version": job.version.id,
            **({"X-Cache": cache} if cache else {}),
            **({DEGRADED_HEADER: job.degraded.header()} if job.degraded else {}),
        }
        status, filters = ("ok", None) if screened is None else screened.audit_status()
        if status == "ok":
            self.metrics.images.labels(job.version.id, plan.sampler).inc(len(images))
            self._audit(
                call, job.request_id, "ok", "ok", plan.params(), job, digest, cache, filters
            )
        # a held answer is audited once the review queue took it (difforge.serving.review)
        # how to get these bytes in-process: "kernels" = Model.with_backend("eager",
        # kernels="invariant"), "chunk" = Model.sample(..., chunk_rows=C)
        batching = None if job.version.plan is None else job.version.plan.describe()
        extra = {
            "role": job.role,
            "nfe": job.nfe,
            "batch_images": job.call_images,
            "batch_invariant": batching is not None and batching["invariant"],
            "batching": batching,
        }
        if len(model.image_shape) == 2:  # a series model: (C, T) float values, never PNG
            if plan.response_format == "csv":
                body = series_csv_body(images, plan.seeds, plan.conditioning)
                return StoredResponse(body, "text/csv", headers)
            body = series_json_body(
                job.request_id, common, images, plan.seeds, plan.conditioning, digest, extra
            )
            return StoredResponse(body, "application/json", headers)
        edits = None if plan.edit is None else [plan.edit.image_params(i) for i in range(plan.n)]
        per_image = None if screened is None else screened.provenance()
        encoded = encode_images(images, common, plan.seeds, plan.conditioning, edits, per_image)
        if plan.response_format == "png":
            return StoredResponse(encoded[0][1], "image/png", headers)
        return StoredResponse(
            json_body(job.request_id, common, encoded, digest, extra),
            "application/json",
            headers,
        )

    def _audit(
        self,
        call: GenerateCall,
        request_id: str,
        status: str,
        reason: str,
        params,
        job: Job | None,
        digest=None,
        cache: str | None = None,
        filters: dict | None = None,
    ):
        version = job.version if job is not None else None
        detail = {}
        if job is not None:
            detail = {
                "steps_completed": job.step,
                "calls": job.call_images,
                "nfe": job.nfe,
                "cancel": job.cancel_reason,
            }
        if cache is not None:  # "hit": answered from the result cache; calls and nfe are the
            detail["cache"] = cache  # stored result's, none of them ran for this request
        if job is not None and job.degraded:  # params are what ran; this is what was asked
            detail["degraded"] = job.degraded.describe()
        if filters is not None:  # the filter stage's decisions and versions
            detail["filters"] = filters
        self.audit.append(
            AuditEntry(
                request_id=request_id,
                status=status,
                http_status=self.status_of(reason),
                params=params,
                latency_ms=(time.monotonic() - call.accepted) * 1000,
                key_id=call.principal.key_id,
                model_name=version.name if version else None,
                model_sha256=version.model.sha256 if version else None,
                role=job.role if job else None,
                output_sha256=digest,
                detail=detail,
            )
        )

    # -- admin -----------------------------------------------------------------------------------

    def request_status(self, request_id: str, principal: Principal) -> dict | StoredResponse | None:
        """A running request's progress, or its audit record; None if absent or not the caller's.
        A request held for review answers its held status (a StoredResponse: 202, then the
        approved images) or raises ServiceError (410 after a rejection or expiry)."""
        held = self.screen.poll(request_id, principal)
        if held is not None:
            return held
        job = self.engine.jobs.get(request_id)
        if job is not None:
            if not (principal.may("admin") or principal.key_id == job.key_id):
                return None
            return {
                "request_id": request_id,
                "status": job.status,
                "progress": round(job.progress, 4),
            }
        record = self.audit.get(request_id)
        if record is None or not (principal.may("admin") or record["key_id"] == principal.key_id):
            return None
        return {
            "request_id": request_id,
            "status": record["status"],
            "progress": 1.0,
            "record": record,
        }


def _set_threads(n: int) -> int:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    return before


async def _disconnected(receive: Receive) -> None:
    """Return when the client has gone (http.disconnect on the ASGI receive channel)."""
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return


__all__ = ["AccessDenied", "GenerateCall", "JobFailed", "Service", "ServiceError"]
