"""The one request resolver: a user request (library call, CLI flags, HTTP body, evaluation config)
becomes a fully resolved `Plan` with the same defaults and the same errors everywhere.

Semantics (README "Requests" documents them):
- n: as given; else len(seeds); else the length of the longest per-image conditioning (or
  init_image / mask) list; else 1.
- seeds: image i uses seed + i, or seeds[i]; no seed: one is drawn at random (< 2**32, so that
  JSON clients hold it exactly) and reported back. Seeds are integers in [0, MAX_SEED].
- conditioning: every other field of the request is a key of the model's conditioning spec (for a
  class-conditional model, `labels`). A value is one entry for all images or a list of one per
  image; a None entry is that key's null value (unconditional); an absent key takes the spec's
  default (classes cycle 0, 1, ...). A key the model does not have is an error. A text key also
  takes a negative prompt (`negative_prompt`): the unconditional branch of guidance, per image.
- guidance: the model's default on a guidable model; on a model with no conditioning it is 1, and
  asking for anything else is an error.
- sampler, steps, grid: the model's defaults. options: the sampler's own knobs, with their types
  (an int knob takes an integer, a float knob a number, a bool knob true/false).
- editing: init_image, mask, strength, resample (difforge.pipeline.editing): img2img / inpainting.
  params() records the inputs by their sha256 (init_image_sha256, mask_sha256); putting the
  images back into those params replays the request, the hashes checked.
Limits (a service's max_n, max_steps, guidance range, allowed samplers) are checked here too.
Every violated field is reported at once as a `RequestInvalid` holding one `FieldProblem` each.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    ValidationError,
)

from difforge.core.errors import InvalidArgumentError
from difforge.core.sigmas import GridKind
from difforge.pipeline.conditioning import ConditioningSpec, FieldProblem, Row
from difforge.pipeline.config import SamplingDefaults
from difforge.pipeline.editing import Edit, per_image_counts, resolve_edit
from difforge.samplers.noise import MAX_SEED


class Model(Protocol):
    """What the resolver reads of a model (a `difforge.pipeline.Model` has these)."""

    spec: ConditioningSpec
    sampling: SamplingDefaults
    image_shape: tuple[int, ...]  # (C, H, W) images or (C, T) series


ResponseFormat = Literal["auto", "png", "json", "csv"]
RANDOM_SEED_BOUND = 2**32  # a drawn seed stays below this


class RequestInvalid(InvalidArgumentError):
    """A request failed resolution: one FieldProblem per violated field."""

    def __init__(self, problems: list[FieldProblem]):
        self.problems = problems
        super().__init__("; ".join(str(p) for p in problems))

    def errors(self, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
        """FastAPI-style detail entries ({"loc", "msg", "type"}), loc prefixed (e.g. "body")."""
        return [{"loc": [*prefix, *p.loc], "msg": p.msg, "type": p.kind} for p in self.problems]


class SampleRequest(BaseModel):
    """What a user asks for. Fields other than these are conditioning keys of the model."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False, frozen=True)

    n: StrictInt | None = None  # images
    seed: StrictInt | None = None  # image i uses seed + i
    seeds: list[StrictInt] | None = None  # one seed per image (instead of seed)
    sampler: str | None = None
    steps: StrictInt | None = None
    guidance: StrictFloat | None = None  # CFG scale (1 = plain conditional); a number, not a bool
    grid: GridKind | None = None
    options: dict[str, StrictInt | StrictFloat | StrictBool] = Field(default_factory=dict)  # knobs
    response_format: ResponseFormat = "auto"  # auto: PNG for one image, JSON for several or series
    deadline_ms: StrictInt | None = None  # give up this long after arrival (services only)
    # editing (difforge.pipeline.editing documents the values): img2img and inpainting
    init_image: Any = None  # PNG bytes / base64 PNG / uint8 (C, H, W) tensor, or one per image
    mask: Any = None  # white = generate, black = keep; like init_image
    strength: StrictFloat | StrictInt | None = None  # (0, 1]; default 0.8 img2img, 1 inpainting
    resample: tuple[StrictInt, StrictInt] | None = None  # RePaint (jump_length, jump_n_sample)
    init_image_sha256: list[str] | None = None  # checks: the inputs must hash to these
    mask_sha256: list[str] | None = None
    adapter: str | None = None  # a LoRA adapter attached to the model (pipeline.adapters)
    # services only: may a cheaper route answer under load (difforge.serving.fallback)? None: the
    # service's policy decides; never part of a Plan (the plan says what was computed)
    allow_degraded: StrictBool | None = None
    # services only: "fast" asks for the distilled student served beside production
    route: Literal["default", "fast"] | None = None

    @property
    def conditioning(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RequestLimits(BaseModel):
    """What one request may ask for (a library call has no limits beyond the seed range)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_steps: int | None = Field(None, ge=1)
    max_n: int | None = Field(None, ge=1)
    min_guidance: float = -math.inf
    max_guidance: float = math.inf
    allowed_samplers: tuple[str, ...] | None = None  # None: every registered sampler
    max_deadline_s: float = 600.0
    max_text_chars: int | None = Field(None, ge=1)  # per prompt (text keys; None: the key's own)
    max_image_bytes: int | None = Field(None, ge=1)  # one encoded init image or mask


@dataclass(frozen=True)
class Plan:
    """A resolved request: what is computed, what the audit log stores and what a replay re-runs."""

    rows: tuple[Row, ...]  # one resolved conditioning per image
    conditioning: dict[str, list[Any]]  # the same as JSON values, {key: one per image}
    seeds: tuple[int, ...]
    guidance: float
    sampler: str
    steps: int
    grid: str
    options: tuple[tuple[str, Any], ...]
    response_format: Literal["png", "json", "csv"]
    deadline_s: float | None
    # guidance's unconditional rows, one per image, when a negative prompt replaces the null
    uncond_rows: tuple[Row, ...] | None = None
    edit: Edit | None = None  # img2img / inpainting inputs (None: generate from noise)
    adapter: str | None = None  # the attached adapter that samples (None: the base)
    route: str | None = None  # a service's route ("fast": its student; None: the default)
    seed_drawn: bool = False  # the request named no seed: one was drawn at random

    @property
    def n(self) -> int:
        return len(self.seeds)

    @property
    def guided(self) -> bool:
        return self.guidance != 1.0

    def params(self) -> dict[str, Any]:
        """JSON parameters; `SampleRequest(**params)` resolves to the same plan (replay)."""
        return {
            **self.conditioning,
            "n": self.n,
            "sampler": self.sampler,
            "steps": self.steps,
            "guidance": self.guidance,
            "grid": self.grid,
            "seeds": list(self.seeds),
            "options": dict(self.options),
            "response_format": self.response_format,
            **(self.edit.params() if self.edit is not None else {}),
            **({"adapter": self.adapter} if self.adapter is not None else {}),
            **({"route": self.route} if self.route is not None else {}),
        }


def parse_request(data: Any) -> SampleRequest:
    """A dict (or SampleRequest) -> SampleRequest, or RequestInvalid naming every bad field."""
    if isinstance(data, SampleRequest):
        return data
    try:
        return SampleRequest.model_validate(data)
    except ValidationError as e:
        raise _from_validation(e) from None


def _from_validation(e: ValidationError) -> RequestInvalid:
    return RequestInvalid(
        [FieldProblem(tuple(err["loc"]), err["msg"], err["type"]) for err in e.errors()]
    )


def _range(problems: list, loc: tuple, value: int, lo: int, hi: int | None) -> None:
    if value < lo or (hi is not None and value > hi):
        hi_s = "inf" if hi is None else str(hi)
        problems.append(FieldProblem(loc, f"must be in [{lo}, {hi_s}], got {value}", "range"))


def _count(req: SampleRequest, spec, limits: RequestLimits, problems: list) -> int:
    # A key may say how many images its value is for (a slot vector: all of them).
    keys = {k.name: k for k in spec.keys}
    lists = [
        keys[k].images(v)
        if hasattr(keys.get(k), "images")
        else len(v)
        if isinstance(v, list)
        else None
        for k, v in req.conditioning.items()
    ]
    lists = [m for m in lists if m is not None]
    lists += per_image_counts(req)  # a list of init images is one per image too
    n = req.n if req.n is not None else len(req.seeds) if req.seeds else max(lists, default=1)
    _range(problems, ("n",), n, 1, limits.max_n)
    if req.seeds is not None and len(req.seeds) != n:
        problems.append(FieldProblem(("seeds",), f"has {len(req.seeds)} entries for n = {n}"))
    return max(1, min(n, limits.max_n or n))


def _seeds(req: SampleRequest, n: int, problems: list) -> tuple[int, ...]:
    if req.seed is not None and req.seeds is not None:
        problems.append(FieldProblem(("seeds",), "give seed or seeds, not both", "conflict"))
        return ()
    if req.seeds is not None:
        for i, s in enumerate(req.seeds):
            _range(problems, ("seeds", i), s, 0, MAX_SEED)
        return tuple(req.seeds)
    seed = secrets.randbelow(RANDOM_SEED_BOUND) if req.seed is None else req.seed
    _range(problems, ("seed",), seed, 0, MAX_SEED)
    if seed + n - 1 > MAX_SEED >= seed:
        problems.append(FieldProblem(("seed",), f"seed + n - 1 must be <= {MAX_SEED}"))
    return tuple(seed + i for i in range(n))


def _texts_fit(values: dict[str, Any], limit: int | None, problems: list) -> None:
    for name, value in values.items():
        for i, v in enumerate(value if isinstance(value, list) else [value]):
            if limit is not None and isinstance(v, str) and len(v) > limit:
                loc = (name, i) if isinstance(value, list) else (name,)
                msg = f"has {len(v)} characters; the limit is {limit}"
                problems.append(FieldProblem(loc, msg, "text"))


def _images_fit(spec, values: dict[str, Any], limit: int | None, problems: list) -> None:
    for key in spec.keys:
        if hasattr(key, "check_size") and values.get(key.name) is not None:
            key.check_size(values[key.name], limit, problems)


def _negative_rows(model: Model, req: SampleRequest, n: int, problems: list):
    try:
        rows = model.spec.resolve_negative(req.conditioning, n)
    except FieldProblem as p:
        problems.append(p)
        return None
    return None if rows is None else tuple(rows)


def _guidance(model: Model, req: SampleRequest, limits: RequestLimits, problems: list) -> float:
    if not model.spec.guidable:
        if req.guidance is not None and req.guidance != 1.0:
            problems.append(
                FieldProblem(("guidance",), "the model has no conditioning: guidance must be 1")
            )
        return 1.0
    w = model.sampling.guidance if req.guidance is None else float(req.guidance)
    if not (math.isfinite(w) and limits.min_guidance <= w <= limits.max_guidance):
        msg = f"must be finite and in [{limits.min_guidance}, {limits.max_guidance}], got {w}"
        problems.append(FieldProblem(("guidance",), msg, "range"))
    return w


def _sampler(req: SampleRequest, default: str, limits: RequestLimits, problems: list):
    from difforge.samplers.registry import SAMPLERS, check_knobs, sampler_knobs

    sampler = req.sampler or default
    allowed = limits.allowed_samplers or tuple(SAMPLERS)
    if sampler not in allowed:
        msg = f"unknown sampler {sampler!r}; allowed: {', '.join(allowed)}"
        problems.append(FieldProblem(("sampler",), msg, "choice"))
        return sampler, ()
    knobs = sampler_knobs(sampler)
    options = {}
    for key, value in req.options.items():
        default_value = knobs.get(key)
        if key not in knobs:
            names = ", ".join(knobs) or "(none)"
            msg = f"not an option of sampler {sampler!r}; allowed: {names}"
            problems.append(FieldProblem(("options", key), msg, "choice"))
        elif (kind := _knob_type(default_value)) is not None and not _fits(value, kind):
            msg = f"must be {kind.__name__} (sampler {sampler!r}), got {value!r}"
            problems.append(FieldProblem(("options", key), msg, "type"))
        else:
            options[key] = float(value) if kind is float else value
    try:
        check_knobs(sampler, options)
    except InvalidArgumentError as e:
        problems.append(FieldProblem(("options",), str(e)))
    return sampler, tuple(sorted(options.items()))


def _knob_type(default: Any) -> type | None:
    for kind in (bool, int, float):
        if isinstance(default, kind):
            return kind
    return None  # no typed default (e.g. None): any JSON scalar


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if kind is int:
        return isinstance(value, int)
    return isinstance(value, int | float) and math.isfinite(value)


def _response_format(model: Model, asked: str, n: int, problems: list) -> str:
    """png: one image; json: images or series; csv: series (one row per series and channel)."""
    series = len(model.image_shape) == 2  # (C, T)
    if series and asked == "png":
        problems.append(FieldProblem(("response_format",), "the model makes series: use json/csv"))
    elif not series and asked == "csv":
        problems.append(FieldProblem(("response_format",), "csv holds series; use png or json"))
    elif asked == "png" and n != 1:
        problems.append(FieldProblem(("response_format",), "png holds one image; use json"))
    if asked != "auto":
        return asked
    return "png" if n == 1 and not series else "json"


def resolve(
    model: Model,
    request: SampleRequest | dict[str, Any],
    limits: RequestLimits | None = None,
    *,
    default_deadline_s: float | None = None,
) -> Plan:
    """Turn `request` into a Plan for `model`, or raise RequestInvalid naming every bad field.

    Args:
        model: the loaded model (its conditioning spec and sampling defaults).
        request: a SampleRequest or its dict (e.g. an HTTP body, CLI flags).
        limits: what a request may ask for (None: no limits beyond the seed range).
        default_deadline_s: the deadline of a request that names none (services).
    """
    req = parse_request(request)
    limits = limits or RequestLimits()
    problems: list[FieldProblem] = []
    n = _count(req, model.spec, limits, problems)
    seeds = _seeds(req, n, problems)
    _texts_fit(req.conditioning, limits.max_text_chars, problems)
    _images_fit(model.spec, req.conditioning, limits.max_image_bytes, problems)
    if any(p.kind == "too_large" for p in problems):
        raise RequestInvalid(problems)  # nothing is decoded past a size limit
    rows = model.spec.resolve_all(req.conditioning, n, problems)
    uncond_rows = _negative_rows(model, req, n, problems)
    guidance = _guidance(model, req, limits, problems)
    sampler, options = _sampler(req, model.sampling.sampler, limits, problems)
    steps = model.sampling.steps if req.steps is None else req.steps
    _range(problems, ("steps",), steps, 1, limits.max_steps)
    fmt = _response_format(model, req.response_format, n, problems)
    deadline = default_deadline_s if req.deadline_ms is None else req.deadline_ms / 1000
    if req.deadline_ms is not None:
        _range(problems, ("deadline_ms",), req.deadline_ms, 1, int(limits.max_deadline_s * 1000))
    edit = resolve_edit(model, req, n, steps, limits.max_image_bytes, problems)
    if req.adapter is not None and req.adapter not in model.adapters:
        names = ", ".join(model.adapters) or "(none attached)"
        problems.append(
            FieldProblem(("adapter",), f"unknown adapter; available: {names}", "choice")
        )
    if problems:
        raise RequestInvalid(problems)
    if edit is not None and edit.settings.inpaint:  # a masked_image key reads the edit
        images, masks = [r.image for r in edit.rows], [r.mask for r in edit.rows]
        rows, uncond_rows = model.spec.fill_from_edit(rows, uncond_rows, images, masks)
    described = [model.spec.describe(r) for r in rows]
    conditioning = {k: [d[k] for d in described] for k in model.spec.names}
    for field, name in model.spec.negative_fields.items() if uncond_rows else ():
        conditioning[field] = [model.spec.key(name).describe_row(r[name]) for r in uncond_rows]
    return Plan(
        rows=tuple(rows),
        conditioning=conditioning,
        seeds=seeds,
        guidance=guidance,
        sampler=sampler,
        steps=steps,
        grid=req.grid or model.sampling.grid,
        options=options,
        response_format=fmt,
        deadline_s=deadline,
        uncond_rows=uncond_rows,
        edit=edit,
        adapter=req.adapter,
        route=req.route,
        seed_drawn=req.seed is None and req.seeds is None,
    )
