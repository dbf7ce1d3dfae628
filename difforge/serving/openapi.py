"""The OpenAPI document of the service: every route, its body, its response types and statuses.

The routes read their bodies themselves (to bound their size before parsing), so FastAPI cannot
infer the contract from them; it is written here instead, from the service's limits and the served
model, and checked against the running app by a schemathesis run (tests/contract).

Rules that span several fields are stated in the descriptions, not in the schema (JSON Schema
cannot say "seeds has n entries"); a body that breaks one is a 422 with a field-level message.
"""

from __future__ import annotations

from typing import Any

from difforge.core.sigmas import GRID_KINDS
from difforge.pipeline import Model
from difforge.samplers.noise import MAX_SEED
from difforge.serving.config import ServiceConfig

JSON = "application/json"

_ERROR = {
    "type": "object",
    "required": ["detail"],
    "properties": {
        "detail": {
            "description": "a message, or FastAPI-style field errors",
            "anyOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["loc", "msg", "type"],
                        "properties": {
                            "loc": {"type": "array", "items": {"type": ["string", "integer"]}},
                            "msg": {"type": "string"},
                            "type": {"type": "string"},
                        },
                    },
                },
            ],
        }
    },
}
_RETRY = {"Retry-After": {"description": "seconds to wait", "schema": {"type": "string"}}}
_WHY = {
    401: "no API key, or an unknown one (keys configured)",
    403: "the key lacks the scope, or (no keys configured) the client is not loopback; or the "
    "output filters refused the output",
    404: "no such request, version or alias",
    409: "in progress (Idempotency-Key, X-Request-Id), refused by the registry, or the held "
    "output was already decided",
    410: "the held output was rejected by a reviewer, expired, or was lost on a restart",
    413: "the body is larger than limits.max_body_bytes",
    415: "the body is not declared application/json",
    422: "a field, header or rule of the request is invalid; detail names each",
    429: "the key's rate limit is exhausted",
    431: "the request headers are larger than 8 KiB",
    499: "the client disconnected before the answer",
    500: "the model failed (an internal error, or non-finite output)",
    503: "warming up, queue full, shutting down, the registry database is unreachable or the "
    "review queue is full",
    504: "the request's deadline passed",
}


def _errors(*codes: int) -> dict[str, Any]:
    out = {}
    for code in codes:
        resp: dict[str, Any] = {
            "description": _WHY[code],
            "content": {JSON: {"schema": _ERROR}},
        }
        if code in (409, 429, 503):
            resp["headers"] = _RETRY
        out[str(code)] = resp
    return out


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}], "default": None}


def _conditioning_schema(key, max_n: int) -> dict[str, Any]:
    """A conditioning key's request value (kinds: "class", "low_res"; "masked_image": set from
    an edit)."""
    if key.kind == "low_res":
        from difforge.serving.upscale import image_schema

        return image_schema(key, max_n)
    if key.kind == "masked_image":  # filled from init_image and mask (pipeline.conditioning)
        return {
            "anyOf": [{"const": "init_image*mask"}, {"type": "null"}],
            "default": None,
            "description": "set from init_image and mask; responses report 'init_image*mask'",
        }
    cls = {"type": "integer", "minimum": 0, "maximum": key.num_classes - 1}
    each = {"anyOf": [cls, {"type": "null"}]}  # None: the null class (unconditional)
    per_image = {"type": "array", "items": each, "minItems": 1, "maxItems": max_n}
    return {
        "anyOf": [cls, per_image, {"type": "null"}],
        "default": None,
        "description": f"a class for every image, or one per image; absent: {key.name} cycle",
    }


def generate_request_schema(config: ServiceConfig, model: Model) -> dict[str, Any]:
    """JSON Schema of the POST /v1/generate body for these limits and this model."""
    lim = config.limits
    seed = {"type": "integer", "minimum": 0, "maximum": MAX_SEED}
    option = {"type": ["number", "boolean"]}
    deadline = {"type": "integer", "minimum": 1, "maximum": int(config.max_deadline_s * 1000)}
    props = {
        "n": _nullable({"type": "integer", "minimum": 1, "maximum": lim.max_n}),
        "sampler": _nullable({"type": "string", "enum": list(lim.allowed_samplers)}),
        "steps": _nullable({"type": "integer", "minimum": 1, "maximum": lim.max_steps}),
        "guidance": _nullable(
            {"type": "number", "minimum": lim.min_guidance, "maximum": lim.max_guidance}
        ),
        "grid": _nullable({"type": "string", "enum": list(GRID_KINDS)}),
        "seed": _nullable(seed),
        "seeds": _nullable({"type": "array", "items": seed, "minItems": 1, "maxItems": lim.max_n}),
        "options": {"type": "object", "additionalProperties": option, "default": {}},
        "response_format": {
            "type": "string",
            "enum": ["auto", "json", "csv"] if _series(model) else ["auto", "png", "json"],
            "default": "auto",
        },
        "deadline_ms": _nullable(deadline),
        "route": _nullable(
            {
                "type": "string",
                "enum": ["default", "fast"],
                "description": "fast: the distilled student served beside production, with its "
                "own sampling defaults (422 when none is served)",
            }
        ),
        "allow_degraded": {
            **_nullable({"type": "boolean"}),
            "description": "under load (circuit breaker open), may a cheaper route answer: "
            f"{config.breaker.degraded_steps} steps, or the fast route's student when one is served; "
            f"null: the service policy decides ({config.breaker.degrade})",
        },
    }
    for key in model.spec.keys:
        props[key.name] = _conditioning_schema(key, lim.max_n)
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": props,
        "description": (
            "Every field is optional; defaults come from the model. Besides the fields listed, "
            "the model's conditioning keys. Rules across fields: n defaults to len(seeds), else "
            "the length of a conditioning list, else 1; a conditioning list has 1 or n entries, "
            "seeds n; give seed or seeds, not both; image i uses seed + i, so seed + n - 1 <= "
            f"{MAX_SEED}; png holds one image; options are the chosen sampler's knobs. "
            "Duplicate keys are refused."
        ),
    }


_IMAGE = {
    "type": "object",
    "required": ["request_id", "model", "model_version", "output_sha256", "images"],
    "properties": {
        "request_id": {"type": "string"},
        "model": {"type": "string"},
        "model_sha256": {"type": "string"},
        "model_version": {"type": "string"},
        "sampler": {"type": "string"},
        "steps": {"type": "integer"},
        "output_sha256": {"type": "string"},
        "images": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["png_base64", "seed"],
                "properties": {"png_base64": {"type": "string"}, "seed": {"type": "integer"}},
            },
        },
    },
}
_OBJECT = {JSON: {"schema": {"type": "object"}}}
_SERIES = {
    "type": "object",
    "required": ["request_id", "model", "model_version", "output_sha256", "series"],
    "properties": {
        "series": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["values", "seed"],
                "properties": {"values": {"type": "array"}, "seed": {"type": "integer"}},
            },
        },
    },
}


def _series(model: Model) -> bool:
    return len(model.image_shape) == 2  # (C, T)


def _upscale_operation(config: ServiceConfig, model: Model) -> dict[str, Any]:
    from difforge.serving.upscale import upscale_request_schema

    op = _generate_operation(config, model)
    schema = upscale_request_schema(config, model, generate_request_schema(config, model))
    return {
        **op,
        "summary": "Upscale images with the served upsampler (422 when it is none)",
        "requestBody": {"required": True, "content": {JSON: {"schema": schema}}},
    }


def _generate_operation(config: ServiceConfig, model: Model) -> dict[str, Any]:
    headers = {n: {"schema": {"type": "string"}} for n in ("X-Request-Id", "X-Output-SHA256")}
    headers["X-Cache"] = {
        "schema": {"type": "string", "enum": ["hit", "miss"]},
        "description": "with the result cache on: hit (served from the cache) or miss",
    }
    headers["X-Difforge-Degraded"] = {
        "schema": {"type": "string"},
        "description": "present when the circuit breaker's cheap route answered: steps=N, then "
        "sampler=NAME and model=VERSION when those changed (the body's degraded record too)",
    }
    return {
        "summary": "Generate images",
        "parameters": [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "schema": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": 128,
                    "pattern": "^[!-~]+$",
                },
                "description": "a retry with the same key and body gets the stored response",
            },
            {
                "name": "X-Request-Id",
                "in": "header",
                "required": False,
                "schema": {"type": "string", "pattern": "^[A-Za-z0-9._-]{8,64}$"},
            },
        ],
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": generate_request_schema(config, model)}},
        },
        "responses": {
            "200": {
                "description": "one image as PNG (with provenance text chunks), or JSON with "
                "base64 PNGs for several (or when response_format is json)",
                "headers": headers,
                "content": (
                    {JSON: {"schema": _SERIES}, "text/csv": {"schema": {"type": "string"}}}
                    if _series(model)
                    else {
                        "image/png": {"schema": {"type": "string", "format": "binary"}},
                        JSON: {"schema": _IMAGE},
                    }
                ),
            },
            **_errors(401, 403, 409, 413, 415, 422, 429, 431, 499, 500, 503, 504),
        },
    }


def _anomaly_operation(config: ServiceConfig) -> dict[str, Any]:
    from difforge.serving.anomaly import MAX_SERIES_PER_N

    values = {"type": "array", "minItems": 1, "items": {"type": "number"}}
    one = {"anyOf": [values, {"type": "array", "minItems": 1, "items": values}]}
    body = {
        "type": "object",
        "required": ["series"],
        "additionalProperties": False,
        "properties": {
            "series": {
                "type": "array",
                "minItems": 1,
                "maxItems": config.limits.max_n * MAX_SERIES_PER_N,
                "items": one,
            }
        },
    }
    return {
        "summary": "Score series with the served anomaly detector (404 when there is none)",
        "requestBody": {"required": True, "content": {JSON: {"schema": body}}},
        "responses": {
            "200": {"description": "scores, flags and the threshold", "content": _OBJECT},
            **_errors(401, 403, 404, 413, 415, 422, 429, 431, 500, 503),
        },
    }


def _get(summary: str, content: dict, *codes: int, public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        "responses": {"200": {"description": "OK", "content": content}, **_errors(*codes)},
    }
    if public:
        op["security"] = []
    return op


def _admin(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {JSON: {"schema": body}}},
        "responses": {
            "200": {"description": "the change, and what is served now", "content": _OBJECT},
            **_errors(401, 403, 404, 409, 413, 415, 422, 431, 503),
        },
    }


def admin_paths() -> dict[str, Any]:
    """The /v1/admin routes (a service that follows a registry)."""
    from difforge.serving.registry_source import CanaryBody, PromoteBody, RollbackBody

    def schema(model) -> dict[str, Any]:
        return model.model_json_schema(ref_template="#/components/schemas/{model}")

    return {
        "/v1/admin/promote": {"post": _admin("Gated promotion", schema(PromoteBody))},
        "/v1/admin/rollback": {"post": _admin("Roll an alias back", schema(RollbackBody))},
        "/v1/admin/canary": {"post": _admin("A new canary, or its share", schema(CanaryBody))},
        "/v1/admin/registry": {
            "get": _get("What is served and what failed", _OBJECT, 401, 403, 431)
        },
    }


_HELD = {
    "description": "held for human review (output filters): poll GET /v1/requests/{request_id}",
    "headers": {"X-Request-Id": {"schema": {"type": "string"}}, **_RETRY},
    "content": {
        JSON: {
            "schema": {
                "type": "object",
                "required": ["request_id", "status", "poll"],
                "properties": {
                    "request_id": {"type": "string"},
                    "status": {"type": "string", "enum": ["held"]},
                    "detail": {"type": "string"},
                    "poll": {"type": "string"},
                },
            }
        }
    },
}
_ID = [{"name": "request_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def review_paths(config: ServiceConfig) -> dict[str, Any]:
    """The review queue's admin routes (output filters configured)."""
    from difforge.serving.review_routes import MAX_NOTE

    state = {
        "name": "state",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["pending", "approved", "all"], "default": "pending"},
    }
    note = {
        "type": "object",
        "additionalProperties": False,
        "properties": {"note": _nullable({"type": "string", "maxLength": MAX_NOTE})},
    }
    image = {
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        JSON: {"schema": {"type": "object"}},
    }

    def decide(summary: str) -> dict[str, Any]:
        return {
            "summary": summary,
            "parameters": _ID,
            "requestBody": {"required": False, "content": {JSON: {"schema": note}}},
            "responses": {
                "200": {"description": "the held output's summary", "content": _OBJECT},
                **_errors(401, 403, 404, 409, 413, 415, 422, 431),
            },
        }

    return {
        "/v1/admin/review": {
            "get": {
                **_get("Outputs held for review, and the queue's use", _OBJECT, 401, 403, 422, 431),
                "parameters": [state],
            }
        },
        "/v1/admin/review/{request_id}": {
            "get": {**_get("A held output's bytes", image, 401, 403, 404, 431), "parameters": _ID}
        },
        "/v1/admin/review/{request_id}/approve": {"post": decide("Approve a held output")},
        "/v1/admin/review/{request_id}/reject": {"post": decide("Reject a held output")},
    }


def openapi_document(
    config: ServiceConfig, model: Model, *, admin: bool, version: str, review: bool = False
) -> dict[str, Any]:
    """The whole OpenAPI 3.1 document; `review`: output filters are on (202s, 410s, the review
    queue's admin routes)."""
    text = {"text/plain": {"schema": {"type": "string"}}}
    paths: dict[str, Any] = {
        "/v1/generate": {"post": _generate_operation(config, model)},
        "/v1/upscale": {"post": _upscale_operation(config, model)},
        "/v1/anomaly/score": {"post": _anomaly_operation(config)},
        "/v1/models": {"get": _get("Served versions, defaults and limits", _OBJECT, 401, 403, 431)},
        "/v1/requests/{request_id}": {
            "get": {
                **_get("A request's progress or audit record", _OBJECT, 401, 403, 404, 431),
                "parameters": [
                    {
                        "name": "request_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
            }
        },
        "/v1/audit/verify": {"get": _get("Check the audit chain", _OBJECT, 401, 403, 431)},
        "/v1/drift": {"get": _get("Drift monitor status", _OBJECT, 401, 403, 404, 431)},
        "/v2/health/live": {"get": _get("Liveness", _OBJECT, 431, public=True)},
        "/v2/health/ready": {"get": _get("Readiness (warmed up)", _OBJECT, 431, 503, public=True)},
        "/metrics": {"get": _get("Prometheus text format 0.0.4", text, 401, 403, 431)},
        "/": {
            "get": _get(
                "A web page to try the model",
                {"text/html": {"schema": {"type": "string"}}},
                403,
                431,
                public=True,
            )
        },
    }
    if admin:
        paths.update(admin_paths())
    if review:
        paths["/v1/generate"]["post"]["responses"]["202"] = _HELD
        poll = paths["/v1/requests/{request_id}"]["get"]
        poll["summary"] = "A request's progress or audit record; a held output's status or images"
        poll["responses"]["200"]["content"] = {
            **poll["responses"]["200"]["content"],
            "image/png": {"schema": {"type": "string", "format": "binary"}},
        }
        poll["responses"] = {"202": _HELD, **poll["responses"], **_errors(410)}
        paths.update(review_paths(config))
    return {
        "openapi": "3.1.0",
        "info": {"title": "difforge", "version": version},
        "paths": paths,
        "components": {
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
            }
        },
        "security": [{"bearer": []}, {"apiKey": []}],
    }
