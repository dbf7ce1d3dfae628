"""The output filter stage of the service and its human review queue.

After sampling, every request's images go through the configured filters
(difforge.pipeline.filters). The request's decision is the most severe of its images':

- pass: answered as usual; each image's provenance (PNG text, JSON) carries every filter's name,
  version and decision under "filters".
- review, with `on_review: "hold"` (the default): the encoded answer is held here and the client
  gets 202 with its request id; `GET /v1/requests/{id}` answers 202 while it is pending, the
  image(s) (200, the bytes the client would have got) once an admin approved it, and 410 after a
  rejection or once it expired. The held images are never returned before approval.
  With `on_review: "refuse"`, review is a refusal.
- refuse: 403 with `refusal_message`; nothing is held.

The queue is bounded by `max_items` and `max_bytes` (the held responses' bytes). Held entries
(pending or approved) expire `retention_s` after they were held; expiry is checked whenever the
queue is used. A hold that does not fit once expired entries are dropped is refused (503
`review_full`, Retry-After): pending outputs are never evicted to make room, since their clients
are waiting for a decision.

Storage is in memory: a restart loses the held outputs (the decision to hold, the approvals and
rejections are in the audit log, so a poll after a restart answers 410, "no longer held"). Every
decision, hold, approval, rejection and expiry is an audit entry (status "held", "refused",
"review_approved", "review_rejected", "review_expired"); metrics count decisions per filter,
decision and model version (difforge_filter_decisions_total) and keep each version's pass rate.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from difforge.core.errors import DifforgeError
from difforge.pipeline.filters import (
    FilterContext,
    FilterSpec,
    FilterStage,
    StageResult,
    build_stage,
)
from difforge.serving.encode import pixels_sha256
from difforge.serving.idempotency import StoredResponse


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ReviewQueueConfig(_Frozen):
    """Bounds of the held outputs (in memory; lost on restart)."""

    max_items: int = Field(256, ge=1)  # held responses, pending or approved
    max_bytes: int = Field(32 * 2**20, ge=1)  # their encoded bytes together
    retention_s: float = Field(86_400.0, gt=0, allow_inf_nan=False)  # from the hold


class FiltersConfig(_Frozen):
    """The output filter stage (`filters` in the service config); no filters: the stage is off.

    "filters": {"stage": [{"name": "policy", "options": {"rules": [
                    {"kind": "mark"}, {"kind": "conditioning", "key": "labels", "equals": [7]}]}}],
                "on_review": "hold", "review": {"max_items": 64, "retention_s": 3600}}
    """

    stage: tuple[FilterSpec, ...] = ()
    on_review: Literal["hold", "refuse"] = "hold"
    refusal_message: str = Field(
        "the output was withheld by the service's output policy", min_length=1, max_length=500
    )
    review: ReviewQueueConfig = Field(default_factory=ReviewQueueConfig)


class ReviewError(DifforgeError):
    """reason: "review_full" (no room), "not_found", "review_conflict" (already decided),
    "review_rejected", "review_expired"."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


State = Literal["pending", "approved"]


@dataclass
class Held:
    """One held answer: the response the client gets once approved, and why it was held."""

    request_id: str
    key_id: str | None
    response: StoredResponse
    filters: list[list[dict[str, Any]]]  # per image, every filter's record
    model_version: str
    held_at: float  # time.time()
    expires: float  # time.monotonic() deadline
    state: State = "pending"
    decided_by: str | None = None

    @property
    def nbytes(self) -> int:
        return len(self.response.body)

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """What an admin lists (no image bytes; GET /v1/admin/review/{id} shows them); `now` is
        the queue's clock (time.monotonic by default)."""
        now = time.monotonic() if now is None else now
        return {
            "request_id": self.request_id,
            "state": self.state,
            "key_id": self.key_id,
            "model_version": self.model_version,
            "held_at": datetime.fromtimestamp(self.held_at, UTC).isoformat(timespec="seconds"),
            "expires_in_s": round(max(0.0, self.expires - now), 1),
            "bytes": self.nbytes,
            "media_type": self.response.media_type,
            "filters": self.filters,
            "decided_by": self.decided_by,
        }


@dataclass
class ReviewQueue:
    """Held answers by request id, bounded in count and bytes, expiring after `retention_s`.
    `on_expire(held)` is called for each entry that expires (the service audits it)."""

    config: ReviewQueueConfig
    on_expire: Callable[[Held], None] = lambda held: None
    clock: Callable[[], float] = time.monotonic
    _items: OrderedDict[str, Held] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def _expire(self) -> None:
        now = self.clock()
        gone = [h for h in self._items.values() if h.expires <= now]
        for h in gone:
            del self._items[h.request_id]
        for h in gone:
            self.on_expire(h)

    def hold(self, held: Held) -> Held:
        """Hold `held` (expires retention_s from now); ReviewError("review_full") if it does not fit."""
        with self._lock:
            self._expire()
            if held.nbytes > self.config.max_bytes:
                raise ReviewError("review_full", "the output is larger than the review queue")
            if len(self._items) >= self.config.max_items or (
                self.nbytes + held.nbytes > self.config.max_bytes
            ):
                raise ReviewError("review_full", "the review queue is full")
            held = replace(held, expires=self.clock() + self.config.retention_s)
            self._items[held.request_id] = held
            return held

    def get(self, request_id: str) -> Held | None:
        with self._lock:
            self._expire()
            return self._items.get(request_id)

    def list(self, state: State | None = "pending") -> list[Held]:
        with self._lock:
            self._expire()
            return [h for h in self._items.values() if state is None or h.state == state]

    def approve(self, request_id: str, reviewer: str | None) -> Held:
        """Mark it approved: its client's next poll gets the images (until it expires)."""
        with self._lock:
            self._expire()
            held = self._pending(request_id)
            held.state, held.decided_by = "approved", reviewer
            return held

    def reject(self, request_id: str, reviewer: str | None) -> Held:
        """Drop it: its bytes are gone, its client's poll answers 410."""
        with self._lock:
            self._expire()
            held = self._pending(request_id)
            del self._items[request_id]
            held.decided_by = reviewer
            return held

    def _pending(self, request_id: str) -> Held:
        held = self._items.get(request_id)
        if held is None:
            raise ReviewError("not_found", "no held output with this request id")
        if held.state != "pending":
            raise ReviewError("review_conflict", f"already {held.state}")
        return held


def held_answer(request_id: str, state: str, detail: str) -> StoredResponse:
    """The 202 body of a held request (its POST answer and its polls while pending)."""
    body = {
        "request_id": request_id,
        "status": state,
        "detail": detail,
        "poll": f"/v1/requests/{request_id}",
    }
    headers = {"X-Request-Id": request_id, "Retry-After": "5"}
    return StoredResponse(json.dumps(body).encode(), "application/json", headers, status=202)


@dataclass(frozen=True)
class ScreenOutcome:
    """The stage's result for one request and what the service does with it."""

    result: StageResult
    outcome: Literal["ok", "held", "refused"]
    versions: list[dict[str, str]]  # every filter's name and version, in order

    def record(self) -> dict[str, Any]:
        """The audit log's `detail.filters`: the decision, the filters' versions, per image."""
        images = self.result.records()
        return {"decision": self.result.decision, "filters": self.versions, "images": images}

    def audit_status(self) -> tuple[str, dict[str, Any]]:
        return self.outcome, self.record()

    def provenance(self) -> list[dict[str, Any]]:
        """Per image, what its PNG text and JSON carry under "filters"."""
        return [
            {"decision": d, "checks": recs}
            for d, recs in zip(self.result.image_decisions, self.result.records(), strict=True)
        ]


def _service_error(reason: str, detail: str, **kw):
    from difforge.serving.service import ServiceError  # service imports this module

    return ServiceError(reason, detail, **kw)


def _feature_net():
    from difforge.evaluation.features import load_feature_extractor

    return load_feature_extractor()  # the shipped MNIST feature net, manifest-checked


class Screen:
    """The service's filter stage, its review queue and their bookkeeping (audit, metrics).

    Args:
        service: the service (its audit log, metrics, engine and `_respond`).
        stage: a built stage instead of `service.config.filters.stage` (tests, embedding).
        context: how filters get their classifier; default: the shipped MNIST feature net.
    """

    def __init__(self, service, stage: FilterStage | None = None, context=None):
        self.service = service
        self.config: FiltersConfig = service.config.filters
        context = context or FilterContext(classifier=_feature_net)
        self.stage = stage if stage is not None else build_stage(self.config.stage, context)
        self.queue = ReviewQueue(self.config.review, on_expire=self._expired)
        self._passed: dict[str, list[int]] = {}  # model version -> [passed, judged] images
        if self.stage:
            self._check(service.router.production.model)

    @property
    def enabled(self) -> bool:
        return bool(self.stage)

    def models_info(self) -> dict[str, Any]:
        """What GET /v1/models tells clients about the filters ({} when off)."""
        if not self.enabled:
            return {}
        return {"filters": {"stage": self.stage.versions(), "on_review": self.config.on_review}}

    def _check(self, model) -> None:
        """Run the stage once on a blank image of the model's shape: a filter that does not fit
        the model (a classifier for other images, a series model) fails at start, not per request."""
        import torch

        from difforge.core.errors import InvalidArgumentError
        from difforge.pipeline.filters import Conditioning

        if len(model.image_shape) != 3:
            raise InvalidArgumentError("output filters apply to image models, not series")
        try:
            self.stage(torch.zeros((1, *model.image_shape), dtype=torch.uint8), Conditioning())
        except Exception as e:
            raise InvalidArgumentError(
                f"the output filters do not fit model {model.name} {model.image_shape}: {e}"
            ) from e

    # -- the generate path ----------------------------------------------------------------------

    async def answer(self, call, job, plan, cache: str | None) -> StoredResponse:
        """Judge the job's images, then answer, hold or refuse (see the module docstring)."""
        svc = self.service
        if not self.enabled:
            return svc._respond(call, job, plan, cache)
        images = [img for img in job.images if img is not None]
        result = await svc.engine.call(self._judge, images, plan)
        self._count(job.version.id, result)
        screened = ScreenOutcome(result, self._outcome(result), self.stage.versions())
        rid = job.request_id
        if screened.outcome == "refused":
            digest = pixels_sha256(images)
            record = screened.record()
            svc._audit(
                call, rid, "refused", "output_refused", plan.params(), job, digest, cache, record
            )
            raise _service_error("output_refused", self.config.refusal_message, request_id=rid)
        response = svc._respond(call, job, plan, cache, screened)  # audits unless held
        if screened.outcome == "ok":
            return response
        held = Held(
            rid, call.principal.key_id, response, result.records(), job.version.id, time.time(), 0.0
        )
        digest = response.headers.get("X-Output-SHA256")
        try:
            self.queue.hold(held)
        except ReviewError as e:
            self._event("full")
            svc._audit(
                call, rid, "refused", e.reason, plan.params(), job, digest, cache, screened.record()
            )
            raise _service_error(e.reason, str(e), retry_after=60.0, request_id=rid) from None
        self._event("held")
        svc._audit(call, rid, "held", "held", plan.params(), job, digest, cache, screened.record())
        return held_answer(rid, "held", "the output is held for review; poll for the decision")

    def _judge(self, images, plan) -> StageResult:
        import torch

        return self.stage(torch.stack(images), plan)  # (N, C, H, W) uint8

    def _outcome(self, result: StageResult) -> Literal["ok", "held", "refused"]:
        if result.decision == "pass":
            return "ok"
        if result.decision == "review" and self.config.on_review == "hold":
            return "held"
        return "refused"

    def _count(self, version: str, result: StageResult) -> None:
        """Decisions per filter, decision and model version; the version's pass rate."""
        m = self.service.metrics
        for decisions in result.per_image:
            for d in decisions:
                m.filter_decisions.labels(d.filter, d.decision, version).inc()
        passed = self._passed.setdefault(version, [0, 0])
        passed[0] += sum(d == "pass" for d in result.image_decisions)
        passed[1] += len(result.image_decisions)
        m.filter_pass_ratio.labels(version).set(passed[0] / passed[1])

    def pass_rate(self, version: str) -> float | None:
        """Fraction of images of `version` that passed every filter since start (None: none)."""
        passed = self._passed.get(version)
        return None if not passed else passed[0] / passed[1]

    # -- polling and review ---------------------------------------------------------------------

    def poll(self, request_id: str, principal) -> StoredResponse | None:
        """A held request's answer for its client (202 pending, 200 approved); 410 after a
        rejection or once gone; None when the request was never held (or is not the caller's)."""
        held = self.queue.get(request_id)
        mine = lambda key_id: principal.may("admin") or principal.key_id == key_id  # noqa: E731
        if held is not None:
            if not mine(held.key_id):
                return None
            if held.state == "pending":
                return held_answer(request_id, "held", "awaiting review")
            return held.response  # approved: the bytes the POST would have answered
        record = self.service.audit.get(request_id)
        if record is None or not mine(record["key_id"]):
            return None
        if record["status"] == "review_rejected":
            raise _service_error("review_rejected", "the output was rejected by a reviewer")
        if record["status"] in ("held", "review_approved", "review_expired"):
            msg = "the output is no longer held (expired, or lost when the service restarted)"
            raise _service_error("review_expired", msg)
        return None

    def held(self, request_id: str) -> Held:
        held = self.queue.get(request_id)
        if held is None:
            raise _service_error("not_found", "no held output with this request id")
        return held

    def decide(
        self, request_id: str, verdict: Literal["approve", "reject"], reviewer, note: str | None
    ) -> Held:
        """Approve or reject a pending output, audited under its client's key id with the
        reviewer's key id in the detail."""
        try:
            if verdict == "approve":
                held = self.queue.approve(request_id, reviewer.key_id)
            else:
                held = self.queue.reject(request_id, reviewer.key_id)
        except ReviewError as e:
            raise _service_error(e.reason, str(e)) from None  # the id is the client's path
        status = "review_approved" if verdict == "approve" else "review_rejected"
        self._event("approved" if verdict == "approve" else "rejected")
        self._audit_review(held, status, {"reviewer": reviewer.key_id, "note": note})
        return held

    def _expired(self, held: Held) -> None:
        self._event("expired")
        self._audit_review(held, "review_expired", {"state": held.state})

    def _audit_review(self, held: Held, status: str, detail: dict[str, Any]) -> None:
        from difforge.serving.audit import AuditEntry

        svc = self.service
        svc.audit.append(
            AuditEntry(
                request_id=held.request_id,
                status=status,
                http_status=svc.status_of("ok" if status == "review_approved" else status),
                params={},
                latency_ms=0.0,
                key_id=held.key_id,
                output_sha256=held.response.headers.get("X-Output-SHA256"),
                detail={**detail, "model_version": held.model_version},
            )
        )

    def _event(self, outcome: str) -> None:
        m = self.service.metrics
        m.review_outcomes.labels(outcome).inc()
        m.review_held.set(len(self.queue))
        m.review_bytes.set(self.queue.nbytes)
