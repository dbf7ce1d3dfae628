"""The HTTP protocol: the request body of POST /v1/generate, its validation against the service's
limits and the model, and the JSON shapes the service answers with.

Validation is the decode step of decode -> batch -> predict -> unbatch -> encode: the body is the
library's `SampleRequest` and `difforge.pipeline.resolve` turns it into a `Plan` (every default
resolved, every field checked: the same defaults and errors as the library and the CLI) or a list
of field-level errors, and nothing reaches the queue before it succeeds. Errors use FastAPI's shape, so clients see one format:
`{"detail": [{"loc": ["body", "steps"], "msg": "...", "type": "..."}]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError

from difforge.common.validation import error_details
from difforge.core.errors import DifforgeError
from difforge.pipeline import Model, Plan, SampleRequest
from difforge.pipeline import RequestInvalid as PipelineRequestInvalid
from difforge.pipeline import resolve as resolve_request
from difforge.serving.config import Limits

__all__ = ["GenerateRequest", "Plan", "RequestInvalid", "field_error", "parse_body", "resolve"]


class RequestInvalid(DifforgeError):
    """A request failed validation; `errors` are FastAPI-style field errors, `status` 422 or 413."""

    def __init__(self, errors: list[dict[str, Any]], status: int = 422):
        self.errors = errors
        self.status = status
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def field_error(field: str | tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    loc = (field,) if isinstance(field, str) else tuple(field)
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


GenerateRequest = SampleRequest  # the body of POST /v1/generate: the library's one request


def parse_body(body: bytes, limits: Limits) -> GenerateRequest:
    """Bytes -> GenerateRequest, or RequestInvalid (413 past the size limit, 422 otherwise)."""
    if len(body) > limits.max_body_bytes:
        raise RequestInvalid(
            [
                field_error(
                    (),
                    f"body is {len(body)} bytes; the limit is {limits.max_body_bytes}",
                    "body_too_large",
                )
            ],
            status=413,
        )
    try:
        return SampleRequest.model_validate_json(body or b"{}")
    except ValidationError as e:
        raise RequestInvalid(error_details(e, prefix=("body",))) from None


def resolve(
    req: SampleRequest,
    limits: Limits,
    model: Model,
    *,
    default_deadline_s: float | None = None,
    max_deadline_s: float = 600.0,
) -> Plan:
    """Resolve `req` for `model` under the service's limits (the library's one resolver).

    Raises:
        RequestInvalid: every violated field, each with its own message (422).
    """
    try:
        return resolve_request(
            model,
            req,
            limits.request_limits(max_deadline_s),
            default_deadline_s=default_deadline_s,
        )
    except PipelineRequestInvalid as e:
        too_large = any(p.kind == "too_large" for p in e.problems)  # an init image or mask
        raise RequestInvalid(e.errors(("body",)), status=413 if too_large else 422) from None


def validation_body(errors: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {"detail": [dict(e) for e in errors]}
