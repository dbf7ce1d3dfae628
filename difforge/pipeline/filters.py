"""Output filters: a stage that judges generated images before anyone sees them.

A filter is a callable with a `name` and a `version`: `filter(images, plan) -> decisions`, one
`FilterDecision` per image, each `pass`, `review` (hold it for a human) or `refuse` (never
return it). `images` are uint8 (N, C, H, W) as the model renders them; `plan` is anything with
the request's per-image `conditioning` ({key: one JSON value per image}: a resolved `Plan`, or an
evaluation's `Requested`). A `FilterStage` runs several filters; an image's decision is the most
severe of its filters' (refuse > review > pass), and a request's the most severe of its images'.

Filters are built by name from `FILTERS` (`register_filter` adds one) with typed options
(`FilterSpec`), so a service config, the CLI and an evaluation name the same filters. Shipped:

- `quality`: the classifier's confidence that the image shows what was asked, P(requested class)
  under softmax (the shipped MNIST feature net's logits); an image asked for no class (null label)
  scores max_c P(c). Below `threshold`: `below` (review by default).
- `policy`: rules, each with an action; the decision is the most severe action of the rules that
  match. Rules: `quality_below` (the score above), `conditioning` (a requested value or a prompt
  word, e.g. a class or words that would claim a real product) and `mark` (`detect_mark`: a
  watermark-like bright block or ink in the image's border).

Nothing here loads weights: the classifier comes from the caller (`FilterContext`), which keeps
this layer below evaluation (the feature net lives in difforge.evaluation.features).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import Tensor

from difforge.common.validation import error_line
from difforge.core.errors import InvalidArgumentError, check_choice

Decision = Literal["pass", "review", "refuse"]
DECISIONS: tuple[Decision, ...] = ("pass", "review", "refuse")
_SEVERITY = {d: i for i, d in enumerate(DECISIONS)}


def most_severe(decisions: Sequence[Decision]) -> Decision:
    """refuse > review > pass; an empty sequence passes."""
    return max(decisions, key=_SEVERITY.__getitem__, default="pass")


@dataclass(frozen=True)
class FilterDecision:
    """One filter's judgement of one image: `score` (the filter's number, if it has one) and
    `reasons` (which rules matched, in words)."""

    filter: str
    version: str
    decision: Decision
    score: float | None = None
    reasons: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        """JSON for provenance, the audit log and responses."""
        score = None if self.score is None else round(float(self.score), 6)
        out = {"filter": self.filter, "version": self.version, "decision": self.decision}
        return {**out, "score": score, "reasons": list(self.reasons)}


class Requested(Protocol):
    """What a filter reads of a request: {conditioning key: one JSON value per image}."""

    conditioning: Mapping[str, Sequence[Any]]


@dataclass(frozen=True)
class Conditioning:
    """A `Requested` without a Plan (evaluation runs): e.g. Conditioning({"labels": [3, 7]})."""

    conditioning: Mapping[str, Sequence[Any]] = field(default_factory=dict)


class OutputFilter(Protocol):
    """A filter: `name` and `version` go into provenance, metrics and the audit log."""

    name: str
    version: str

    def __call__(self, images: Tensor, plan: Requested) -> list[FilterDecision]: ...

    def describe(self) -> dict[str, Any]: ...


@runtime_checkable
class Classifier(Protocol):
    """Images (float32 in [-1, 1], (B, C, H, W)) -> logits (B, classes); named by its sha256.
    The one classifier protocol: difforge.evaluation re-exports it."""

    name: str
    sha256: str

    def logits(self, x: Tensor) -> Tensor: ...


@dataclass(frozen=True)
class FilterContext:
    """What filters may need from outside this layer; `classifier` is called once, when a
    filter that needs it is built (serving and evaluation pass the shipped feature net's loader)."""

    classifier: Callable[[], Classifier] | None = None

    def load_classifier(self, who: str) -> Classifier:
        if self.classifier is None:
            raise InvalidArgumentError(f"filter {who!r} needs a classifier and none was given")
        return self.classifier()


class _Options(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)


# -- quality ---------------------------------------------------------------------------------


class QualityOptions(_Options):
    """`quality`: P(requested class) below `threshold` gets `below`."""

    threshold: float = Field(0.5, ge=0, le=1)
    key: str = "labels"  # the conditioning key holding the class
    below: Literal["review", "refuse"] = "review"


def class_confidence(classifier: Classifier, images: Tensor, classes: Sequence[Any]) -> Tensor:
    """P(class_i | image_i) under softmax of the classifier's logits, float (N,); a None class
    (nothing asked) gives max_c P(c). images: uint8 (N, C, H, W)."""
    x = images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], as the classifier was trained
    with torch.no_grad():
        probs = torch.softmax(classifier.logits(x).float(), dim=1)  # (N, classes)
    out = probs.amax(dim=1)
    for i, c in enumerate(classes):
        if c is not None:
            if not (isinstance(c, int) and 0 <= c < probs.shape[1]):
                raise InvalidArgumentError(f"class {c!r} is not one of the classifier's")
            out[i] = probs[i, c]
    return out


def _classes(plan: Requested, key: str, n: int) -> list[Any]:
    values = plan.conditioning.get(key)
    return [None] * n if values is None else list(values)


class QualityFilter:
    """The feature net's confidence that each image shows the class it was asked for."""

    name = "quality"
    version = "1"

    def __init__(self, options: QualityOptions, classifier: Classifier):
        self.options, self.classifier = options, classifier

    def scores(self, images: Tensor, plan: Requested) -> Tensor:
        classes = _classes(plan, self.options.key, images.shape[0])
        return class_confidence(self.classifier, images, classes)

    def __call__(self, images: Tensor, plan: Requested) -> list[FilterDecision]:
        out = []
        for s in self.scores(images, plan).tolist():
            low = s < self.options.threshold
            why = (f"quality {s:.3f} < {self.options.threshold}",) if low else ()
            decision = self.options.below if low else "pass"
            out.append(FilterDecision(self.name, self.version, decision, s, why))
        return out

    def describe(self) -> dict[str, Any]:
        clf = {"name": self.classifier.name, "sha256": self.classifier.sha256}
        return {"name": self.name, "version": self.version, **self.options.model_dump()} | {
            "classifier": clf
        }


# -- marks -----------------------------------------------------------------------------------


class MarkOptions(_Options):
    """A mark is ink (pixels >= `level`) where a generated digit has none: `min_border_pixels`
    or more in the outer `border` pixels, or an all-ink square of side `block`.

    Defaults measured on the 10k MNIST test images (28x28): 0 of them have 6 ink pixels in the
    2-pixel border, 7 (0.07%) an 8x8 all-ink square (benchmarks/filters.py measures both on
    real and stamped images)."""

    level: int = Field(200, ge=1, le=255)
    border: int = Field(2, ge=1)
    min_border_pixels: int = Field(6, ge=1)
    block: int = Field(8, ge=2)


def detect_mark(images: Tensor, options: MarkOptions = MarkOptions()) -> list[str | None]:
    """Per image: what looks like a mark (in words), or None. images: uint8 (N, C, H, W); a pixel
    is ink when any channel reaches `options.level`."""
    ink = (images >= options.level).any(dim=1).float()  # (N, H, W)
    h, w = ink.shape[1:]
    b = options.border
    band = torch.ones(h, w)
    band[b : h - b, b : w - b] = 0
    in_border = (ink * band).sum(dim=(1, 2))  # (N,)
    k = options.block
    if k <= min(h, w):  # fraction of ink in every k x k window; 1 = all ink
        full = torch.nn.functional.avg_pool2d(ink[:, None], k, stride=1)[:, 0]
        blocks = (full >= 1 - 1e-6).flatten(1).any(dim=1)
    else:
        blocks = torch.zeros(ink.shape[0], dtype=torch.bool)
    out = []
    for n_border, block in zip(in_border.tolist(), blocks.tolist(), strict=True):
        if n_border >= options.min_border_pixels:
            out.append(f"{int(n_border)} ink pixels in the {b}-pixel border")
        elif block:
            out.append(f"an all-ink {k}x{k} block")
        else:
            out.append(None)
    return out


# -- policy ----------------------------------------------------------------------------------


class _Rule(_Options):
    action: Literal["review", "refuse"] = "review"
    name: str | None = None  # shown in reasons; default: the rule's kind


class QualityRule(_Rule):
    """The image's quality score (see `quality`) is below `threshold`."""

    kind: Literal["quality_below"]
    threshold: float = Field(0.5, ge=0, le=1)
    key: str = "labels"


class ConditioningRule(_Rule):
    """The request asked for one of `equals` under `key`, or its (text) value contains one of
    the words `contains` (case-insensitive, whole words)."""

    kind: Literal["conditioning"]
    key: str
    equals: tuple[int | str | None, ...] = ()
    contains: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _something(self) -> ConditioningRule:
        if not self.equals and not self.contains:
            raise ValueError("a conditioning rule needs equals or contains")
        return self

    def matches(self, value: Any) -> bool:
        if value in self.equals:
            return True
        words = str(value).lower().split() if isinstance(value, str) else []
        return any(w.lower() in words for w in self.contains)


class MarkRule(_Rule):
    """The image carries a mark (`detect_mark`)."""

    kind: Literal["mark"]
    detector: MarkOptions = Field(default_factory=MarkOptions)


Rule = Annotated[QualityRule | ConditioningRule | MarkRule, Field(discriminator="kind")]


class PolicyOptions(_Options):
    """`policy`: the rules, in order. The default routes to review what carries a mark or
    misses the quality bar; add conditioning rules for what would claim a real product."""

    rules: tuple[Rule, ...] = (
        MarkRule(kind="mark"),
        QualityRule(kind="quality_below", threshold=0.5),
    )


class PolicyFilter:
    """Routes images to review (or refuses them) under configurable rules."""

    name = "policy"
    version = "1"

    def __init__(self, options: PolicyOptions, classifier: Classifier | None):
        self.options, self.classifier = options, classifier

    def _matches(self, rule, images: Tensor, plan: Requested) -> list[str | None]:
        label = rule.name or rule.kind
        n = images.shape[0]
        if isinstance(rule, MarkRule):
            return [
                None if m is None else f"{label}: {m}" for m in detect_mark(images, rule.detector)
            ]
        if isinstance(rule, QualityRule):
            classes = _classes(plan, rule.key, n)
            s = class_confidence(self.classifier, images, classes).tolist()
            return [
                f"{label}: {v:.3f} < {rule.threshold}" if v < rule.threshold else None for v in s
            ]
        values = _classes(plan, rule.key, n)
        return [f"{label}: {rule.key}={v!r}" if rule.matches(v) else None for v in values]

    def __call__(self, images: Tensor, plan: Requested) -> list[FilterDecision]:
        n = images.shape[0]
        actions: list[list[Decision]] = [[] for _ in range(n)]
        reasons: list[list[str]] = [[] for _ in range(n)]
        for rule in self.options.rules:
            for i, why in enumerate(self._matches(rule, images, plan)):
                if why is not None:
                    actions[i].append(rule.action)
                    reasons[i].append(why)
        return [
            FilterDecision(self.name, self.version, most_severe(a), None, tuple(r))
            for a, r in zip(actions, reasons, strict=True)
        ]

    def describe(self) -> dict[str, Any]:
        out = {"name": self.name, "version": self.version, **self.options.model_dump()}
        if self.classifier is not None:
            out["classifier"] = {"name": self.classifier.name, "sha256": self.classifier.sha256}
        return out


def _build_quality(options: QualityOptions, context: FilterContext) -> QualityFilter:
    return QualityFilter(options, context.load_classifier("quality"))


def _build_policy(options: PolicyOptions, context: FilterContext) -> PolicyFilter:
    needs = any(isinstance(r, QualityRule) for r in options.rules)
    return PolicyFilter(options, context.load_classifier("policy") if needs else None)


# -- the registry and the stage --------------------------------------------------------------


@dataclass(frozen=True)
class FilterKind:
    """A registered filter: its typed options and how to build it."""

    options: type[BaseModel]
    build: Callable[[Any, FilterContext], OutputFilter]


FILTERS: dict[str, FilterKind] = {
    "quality": FilterKind(QualityOptions, _build_quality),
    "policy": FilterKind(PolicyOptions, _build_policy),
}


def register_filter(
    name: str, options: type[BaseModel], build: Callable[[Any, FilterContext], OutputFilter]
) -> None:
    """Make `name` buildable from a FilterSpec; `build(options, context)` returns the filter."""
    if name in FILTERS:
        raise InvalidArgumentError(f"a filter named {name!r} is already registered")
    FILTERS[name] = FilterKind(options, build)


class FilterSpec(_Options):
    """A filter by name with its options, e.g. {"name": "quality", "options": {"threshold": 0.7}}."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _known(self) -> FilterSpec:
        check_choice("filter", self.name, FILTERS)
        self.typed_options()
        return self

    def typed_options(self) -> BaseModel:
        try:
            return FILTERS[self.name].options.model_validate(self.options)
        except ValidationError as e:
            raise ValueError(f"filter {self.name!r}: {error_line(e)}") from None


@dataclass(frozen=True)
class StageResult:
    """Per image: every filter's decision and the combined one; `decision` is the request's."""

    per_image: tuple[tuple[FilterDecision, ...], ...]

    @property
    def image_decisions(self) -> list[Decision]:
        return [most_severe([d.decision for d in ds]) for ds in self.per_image]

    @property
    def decision(self) -> Decision:
        return most_severe(self.image_decisions)

    def records(self) -> list[list[dict[str, Any]]]:
        return [[d.record() for d in ds] for ds in self.per_image]


class FilterStage:
    """Filters run in order on the same images; see the module docstring for how they combine."""

    def __init__(self, filters: Sequence[OutputFilter]):
        self.filters = tuple(filters)

    def __bool__(self) -> bool:
        return bool(self.filters)

    def __call__(self, images: Tensor, plan: Requested) -> StageResult:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise InvalidArgumentError(
                f"output filters take uint8 images (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}"
            )
        columns = []
        for f in self.filters:
            decisions = f(images, plan)
            if len(decisions) != images.shape[0]:  # one decision per image, or the stage breaks
                raise InvalidArgumentError(
                    f"filter {f.name} gave {len(decisions)} decisions for {images.shape[0]} images"
                )
            columns.append(decisions)
        return StageResult(tuple(zip(*columns, strict=True)) if columns else ((),) * len(images))

    def describe(self) -> list[dict[str, Any]]:
        return [f.describe() for f in self.filters]

    def versions(self) -> list[dict[str, str]]:
        return [{"name": f.name, "version": f.version} for f in self.filters]


def build_stage(specs: Sequence[FilterSpec], context: FilterContext | None = None) -> FilterStage:
    """The filters named by `specs`, built in order."""
    context = context or FilterContext()
    return FilterStage([FILTERS[s.name].build(s.typed_options(), context) for s in specs])


def pass_rate(results: Sequence[StageResult]) -> float:
    """Fraction of images whose combined decision is pass (NaN for no images)."""
    decisions = [d for r in results for d in r.image_decisions]
    return sum(d == "pass" for d in decisions) / len(decisions) if decisions else math.nan
