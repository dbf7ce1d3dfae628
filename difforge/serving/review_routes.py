"""The admin routes of the review queue (difforge.serving.review), mounted when output filters
are configured. Thin: authorize (admin scope), parse, hand to the service's `Screen`, encode.

    GET  /v1/admin/review                  held outputs (?state=pending|approved|all), queue use
    GET  /v1/admin/review/{id}             one held output's bytes, for the reviewer to look at
    POST /v1/admin/review/{id}/approve     {note?}: its client's next poll gets the images
    POST /v1/admin/review/{id}/reject      {note?}: dropped; its client's poll answers 410
"""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from difforge.common.validation import error_details
from difforge.serving.protocol import RequestInvalid

MAX_NOTE = 500  # characters of a reviewer's note


class DecisionBody(BaseModel):
    """The body of approve / reject (optional): a note for the audit log."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    note: str | None = Field(None, max_length=MAX_NOTE)


def _decision_body(raw: bytes) -> DecisionBody:
    if not raw.strip():
        return DecisionBody()
    try:
        return DecisionBody.model_validate_json(raw)
    except ValidationError as e:
        raise RequestInvalid(error_details(e, prefix=("body",))) from None


def review_router(service) -> APIRouter:
    """The routes over `service.screen` (the app mounts them when the stage is on)."""
    from difforge.serving.app import _principal, _stored, read_body, require_json

    router = APIRouter()
    screen = service.screen
    limit = service.config.limits.max_body_bytes

    @router.get("/v1/admin/review")
    async def review_list(request: Request, state: str = "pending") -> dict:
        _principal(service, request, "admin")
        if state not in ("pending", "approved", "all"):
            msg = "one of pending, approved, all"
            raise RequestInvalid([{"loc": ["query", "state"], "msg": msg, "type": "enum"}])
        held = screen.queue.list(None if state == "all" else state)
        q = screen.queue
        return {
            "held": [h.summary(q.clock()) for h in held],
            "items": len(q),
            "bytes": q.nbytes,
            "max_items": q.config.max_items,
            "max_bytes": q.config.max_bytes,
            "retention_s": q.config.retention_s,
        }

    @router.get("/v1/admin/review/{request_id}")
    async def review_show(request_id: str, request: Request) -> Response:
        _principal(service, request, "admin")
        held = screen.held(request_id)
        resp = _stored(held.response)
        resp.status_code = 200
        resp.headers["X-Review-State"] = held.state
        return resp

    async def decide(request: Request, request_id: str, verdict: Literal["approve", "reject"]):
        who = _principal(service, request, "admin")
        raw = b""
        if request.headers.get("content-length") not in (None, "0"):
            require_json(request)
            raw = await read_body(request, limit)
        body = _decision_body(raw)
        return screen.decide(request_id, verdict, who, body.note).summary(screen.queue.clock())

    @router.post("/v1/admin/review/{request_id}/approve")
    async def review_approve(request_id: str, request: Request) -> dict:
        return await decide(request, request_id, "approve")

    @router.post("/v1/admin/review/{request_id}/reject")
    async def review_reject(request_id: str, request: Request) -> dict:
        return await decide(request, request_id, "reject")

    return router


__all__ = ["DecisionBody", "review_router"]
