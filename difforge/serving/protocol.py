"""The HTTP protocol: the request body of POST /v1/generate, its validation against the service's
limits and the model, and the JSON shapes the service answers with.

Validation is the decode step of decode -> batch -> predict -> unbatch -> encode: the body is the
library's `SampleRequest` and `difforge.pipeline.resolve` turns it into a `Plan` (every default
resolved, every field checked: the same defaults and errors as the library and the CLI) or a list
of field-level errors, and nothing reaches the queue before it succeeds. Errors use FastAPI's shape, so clients see one format:
`{"detail": [{"loc": ["body", "steps"], "msg": "...", "type": "..."}]}`.
"""

from __future__ import annotations

import contextlib
import json
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
    """A request failed validation; `errors` are FastAPI-style field errors, `reason`
    "validation" or "body_too_large"."""

    def __init__(self, errors: list[dict[str, Any]], reason: str = "validation"):
        self.errors = errors
        self.reason = reason
        super().__init__("; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in errors))


def field_error(field: str | tuple, msg: str, kind: str = "value_error") -> dict[str, Any]:
    loc = (field,) if isinstance(field, str) else tuple(field)
    return {"loc": ["body", *loc], "msg": msg, "type": kind}


GenerateRequest = SampleRequest  # the body of POST /v1/generate: the library's one request


def parse_body(body: bytes, limits: Limits) -> GenerateRequest:
    """Bytes -> GenerateRequest, or RequestInvalid ("body_too_large" past the size limit)."""
    if len(body) > limits.max_body_bytes:
        raise RequestInvalid(
            [
                field_error(
                    (),
                    f"body is {len(body)} bytes; the limit is {limits.max_body_bytes}",
                    "body_too_large",
                )
            ],
            reason="body_too_large",
        )
    if not body.strip():
        raise RequestInvalid([field_error((), "the body is empty; send a JSON object", "missing")])
    _refuse_duplicate_keys(body)
    try:
        return SampleRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestInvalid(error_details(e, prefix=("body",))) from None


def _refuse_duplicate_keys(body: bytes) -> None:
    """RequestInvalid if a JSON object in `body` repeats a key (JSON parsers disagree on which
    one wins; the audit log must record what the client meant). Invalid JSON is left to pydantic,
    whose error says where."""

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in items]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise RequestInvalid(
                [field_error(k, "the key appears more than once", "duplicate_key") for k in dupes]
            )
        return dict(items)

    with contextlib.suppress(ValueError):  # RequestInvalid is no ValueError: it goes through
        json.loads(body, object_pairs_hook=pairs)


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
        RequestInvalid: every violated field, each with its own message.
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
        reason = "body_too_large" if too_large else "validation"
        raise RequestInvalid(e.errors(("body",)), reason) from None


def validation_body(errors: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {"detail": [dict(e) for e in errors]}
