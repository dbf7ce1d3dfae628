"""The HTTP protocol: the request body of POST /v1/generate, its validation against the service's
limits and the model, and the JSON shapes the service answers with.

Validation is the decode step of decode -> batch -> predict -> unbatch -> encode: it turns a body
into a `Plan` (every default resolved, every field checked) or a list of field-level errors, and
nothing reaches the queue before it succeeds. Errors use FastAPI's shape, so clients see one format:
`{"detail": [{"loc": ["body", "steps"], "msg": "...", "type": "..."}]}`.
"""

from __future__ import annotations

import contextlib
import json
import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from difforge.core.errors import DifforgeError
from difforge.serving.config import MAX_SEED, Limits

ResponseFormat = Literal["auto", "png", "json"]


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


class GenerateRequest(BaseModel):
    """The body of POST /v1/generate. Every field is optional; defaults come from the model."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)

    labels: list[StrictInt] | None = (
        None  # one class per image, or one for all; None: unconditional
    )
    n: StrictInt | None = None  # images; default len(labels), len(seeds) or 1
    sampler: str | None = None  # a name in the service's allowed samplers
    steps: StrictInt | None = None  # sampling steps
    guidance: float | None = None  # classifier-free guidance scale (1 = plain conditional)
    seed: StrictInt | None = None  # image i uses seed + i; default: a random seed, reported back
    seeds: list[StrictInt] | None = None  # one seed per image (instead of seed)
    options: dict[str, float] = Field(default_factory=dict)  # sampler knobs, e.g. {"eta": 0.5}
    response_format: ResponseFormat = "auto"  # auto: PNG for one image, JSON for several
    deadline_ms: StrictInt | None = None  # give up (504) this long after arrival


@dataclass(frozen=True)
class ModelFacts:
    """What validation needs to know about the served model."""

    num_classes: int
    sampler: str  # defaults
    steps: int
    guidance: float
    grid: str


@dataclass(frozen=True)
class Plan:
    """A validated request with every default resolved: what the engine computes, what the audit
    log stores and what a replay re-runs."""

    labels: (
        tuple[int, ...] | None
    )  # one per image; None: unconditional (null class if the model has classes)
    seeds: tuple[int, ...]
    guidance: float
    sampler: str
    steps: int
    grid: str
    options: tuple[tuple[str, float], ...]
    response_format: Literal["png", "json"]
    deadline_s: float | None

    @property
    def n(self) -> int:
        return len(self.seeds)

    def params(self) -> dict[str, Any]:
        """The JSON parameters stored in the audit log; `GenerateRequest(**params)` replays them."""
        return {
            "labels": None if self.labels is None else list(self.labels),
            "n": self.n,
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance": self.guidance,
            "seeds": list(self.seeds),
            "options": dict(self.options),
            "response_format": self.response_format,
        }


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
        return GenerateRequest.model_validate_json(body)
    except ValidationError as e:
        raise RequestInvalid(
            [
                {"loc": ["body", *e_["loc"]], "msg": e_["msg"], "type": e_["type"]}
                for e_ in e.errors()
            ]
        ) from None


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


def _check_range(errors: list, field: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        errors.append(field_error(field, f"must be in [{lo}, {hi}], got {value}", "out_of_range"))


def _resolve_count(req: GenerateRequest, limits: Limits, errors: list) -> int:
    """n as given, else len(seeds), else len(labels) (one label means one image), else 1."""
    if req.n is not None:
        n = req.n
    elif req.seeds:
        n = len(req.seeds)
    else:
        n = len(req.labels) if req.labels else 1
    _check_range(errors, "n", n, 1, limits.max_n)
    for name, values in (("labels", req.labels), ("seeds", req.seeds)):
        if values is None:
            continue
        if not values:
            errors.append(field_error(name, "must not be empty", "length"))
        elif len(values) != n and not (name == "labels" and len(values) == 1):
            errors.append(field_error(name, f"has {len(values)} entries for n = {n}", "length"))
    return min(max(n, 1), limits.max_n)  # a bad n is reported; go on checking the rest


def _resolve_seeds(req: GenerateRequest, n: int, errors: list) -> tuple[int, ...]:
    if req.seed is not None and req.seeds is not None:
        errors.append(field_error("seeds", "give seed or seeds, not both", "conflict"))
        return ()
    if req.seeds is not None:
        for i, s in enumerate(req.seeds):
            _check_range(errors, ("seeds", i), s, 0, MAX_SEED)
        return tuple(req.seeds)
    seed = secrets.randbelow(MAX_SEED + 2 - n) if req.seed is None else req.seed
    _check_range(errors, "seed", seed, 0, MAX_SEED)
    if seed + n - 1 > MAX_SEED >= seed:
        errors.append(
            field_error("seed", f"seed + n - 1 must be <= {MAX_SEED} (image i uses seed + i)")
        )
    return tuple(seed + i for i in range(n))


def _resolve_labels(
    req: GenerateRequest, n: int, facts: ModelFacts, errors: list
) -> tuple[int, ...] | None:
    if req.labels is None:
        return None  # unconditional (the null class on a class-conditional model)
    if facts.num_classes == 0:
        errors.append(field_error("labels", "this model is unconditional: give no labels"))
        return None
    for i, lab in enumerate(req.labels):
        _check_range(errors, ("labels", i), lab, 0, facts.num_classes - 1)
    return tuple(req.labels) * (n if len(req.labels) == 1 else 1)


def _resolve_guidance(req: GenerateRequest, conditional: bool, limits: Limits, facts, errors):
    if not conditional:
        if req.guidance is not None and req.guidance != 1.0:
            errors.append(
                field_error("guidance", "guidance needs labels (unconditional samples use 1)")
            )
        return 1.0
    w = facts.guidance if req.guidance is None else req.guidance
    if not (math.isfinite(w) and limits.min_guidance <= w <= limits.max_guidance):
        errors.append(
            field_error(
                "guidance",
                f"must be finite and in [{limits.min_guidance}, {limits.max_guidance}], got {w}",
                "out_of_range",
            )
        )
    return float(w)


def _resolve_sampler(req: GenerateRequest, limits: Limits, facts: ModelFacts, errors: list):
    from difforge.samplers import sampler_knobs

    sampler = req.sampler or facts.sampler
    if sampler not in limits.allowed_samplers:
        allowed = ", ".join(limits.allowed_samplers)
        errors.append(
            field_error("sampler", f"unknown sampler {sampler!r}; allowed: {allowed}", "choice")
        )
        return sampler, ()
    knobs = sampler_knobs(sampler)
    for key, value in req.options.items():
        if not isinstance(knobs.get(key), float):
            allowed = ", ".join(k for k, v in knobs.items() if isinstance(v, float))
            errors.append(
                field_error(
                    ("options", key),
                    f"not an option of sampler {sampler!r}; allowed: {allowed or '(none)'}",
                    "choice",
                )
            )
        elif not (math.isfinite(value) and 0.0 <= value <= 100.0):
            errors.append(field_error(("options", key), "must be finite and in [0, 100]"))
    return sampler, tuple(sorted(req.options.items()))


def resolve(
    req: GenerateRequest,
    limits: Limits,
    facts: ModelFacts,
    *,
    default_deadline_s: float | None = None,
    max_deadline_s: float = 600.0,
) -> Plan:
    """Check `req` against the limits and the model; fill in defaults.

    Raises:
        RequestInvalid: every violated field, each with its own message.
    """
    errors: list[dict[str, Any]] = []
    n = _resolve_count(req, limits, errors)
    seeds = _resolve_seeds(req, n, errors)
    labels = _resolve_labels(req, n, facts, errors)
    guidance = _resolve_guidance(req, labels is not None, limits, facts, errors)
    sampler, options = _resolve_sampler(req, limits, facts, errors)
    steps = facts.steps if req.steps is None else req.steps
    _check_range(errors, "steps", steps, 1, limits.max_steps)
    fmt = req.response_format
    if fmt == "png" and n != 1:
        errors.append(field_error("response_format", "png holds one image; use json for n > 1"))
    deadline = default_deadline_s if req.deadline_ms is None else req.deadline_ms / 1000
    if req.deadline_ms is not None and not 1 <= req.deadline_ms <= max_deadline_s * 1000:
        errors.append(field_error("deadline_ms", f"must be in [1, {max_deadline_s * 1000:.0f}] ms"))
    if errors:
        raise RequestInvalid(errors)
    return Plan(
        labels=labels,
        seeds=seeds,
        guidance=guidance,
        sampler=sampler,
        steps=steps,
        grid=facts.grid,
        options=options,
        response_format="png" if fmt == "png" or (fmt == "auto" and n == 1) else "json",
        deadline_s=deadline,
    )


def validation_body(errors: list[Mapping[str, Any]]) -> dict[str, Any]:
    return {"detail": [dict(e) for e in errors]}
