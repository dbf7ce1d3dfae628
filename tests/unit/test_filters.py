"""Output filters (difforge.pipeline.filters) on real MNIST digits and the shipped feature net,
the mark detector on stamped images, the policy's rules, the registry and the review queue."""

from __future__ import annotations

import pytest
import torch

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline.filters import (
    FILTERS,
    Conditioning,
    FilterContext,
    FilterDecision,
    FilterSpec,
    FilterStage,
    MarkOptions,
    build_stage,
    detect_mark,
    most_severe,
    pass_rate,
    register_filter,
)


@pytest.fixture(scope="module")
def digits():
    """200 MNIST test digits (uint8 (N, 1, 28, 28)) and their labels."""
    from difforge.data.mnist import load_mnist

    ds = load_mnist("test")
    return ds.images[:200].clone(), ds.labels[:200].tolist()


@pytest.fixture(scope="module")
def context():
    from difforge.evaluation.features import load_feature_extractor

    net = load_feature_extractor()
    return FilterContext(classifier=lambda: net)


def stamp(images: torch.Tensor, kind: str) -> torch.Tensor:
    """A copy with a mark: a solid corner patch, or a text-like bar along the bottom border."""
    out = images.clone()
    if kind == "corner":
        out[:, :, 0:4, 22:28] = 255  # 4x6 patch in the top-right corner
    elif kind == "bar":
        out[:, :, 26:28, 6:22:2] = 230  # dashes, like a line of small letters
    elif kind == "block":
        out[:, :, 10:19, 10:19] = 255  # a 9x9 label pasted over the digit
    return out


def test_quality_is_the_feature_nets_confidence_in_the_requested_class(digits, context):
    images, labels = digits
    stage = build_stage([FilterSpec(name="quality", options={"threshold": 0.5})], context)
    right = stage(images, Conditioning({"labels": labels}))
    wrong = stage(images, Conditioning({"labels": [(y + 1) % 10 for y in labels]}))
    assert pass_rate([right]) >= 0.97  # the net is 99.5% accurate on MNIST test
    assert pass_rate([wrong]) <= 0.03
    scores = [ds[0].score for ds in right.per_image]
    assert all(0 <= s <= 1 for s in scores)
    low = [ds[0] for ds in wrong.per_image if ds[0].decision == "review"]
    assert low and low[0].reasons[0].startswith("quality ") and low[0].version == "1"
    # nothing asked (null label): the score is the top class probability, so real digits pass
    free = stage(images, Conditioning({"labels": [None] * len(labels)}))
    assert pass_rate([free]) >= 0.97


def test_mark_detector_finds_stamped_marks_and_not_real_digits(digits):
    images, _ = digits
    assert detect_mark(images) == [None] * len(images)
    for kind in ("corner", "bar", "block"):
        found = detect_mark(stamp(images, kind))
        assert all(f is not None for f in found), kind
    assert "border" in detect_mark(stamp(images[:1], "corner"))[0]
    assert "block" in detect_mark(stamp(images[:1], "block"))[0]
    # a dim stamp is below the ink level and not a mark
    dim = images.clone()
    dim[:, :, 0:4, 22:28] = 100
    assert detect_mark(dim, MarkOptions(level=200)) == [None] * len(images)


def test_policy_routes_by_rules_and_takes_the_most_severe_action(digits, context):
    images, labels = digits
    rules = [
        {"kind": "mark"},
        {"kind": "quality_below", "threshold": 0.5},
        {"kind": "conditioning", "key": "labels", "equals": [0], "action": "refuse"},
        {"kind": "conditioning", "key": "prompt", "contains": ["Brand"], "name": "product"},
    ]
    stage = build_stage([FilterSpec(name="policy", options={"rules": rules})], context)
    x = images[:6].clone()
    x[1] = stamp(x[1:2], "corner")[0]
    asked = [labels[0], labels[1], 0, labels[3], labels[4], labels[5]]  # image 2 asks for a 0
    prompts = ["a", "a", "a", "a", "a BRAND new 5", "brandy"]  # whole words, any case
    result = stage(x, Conditioning({"labels": asked, "prompt": prompts}))
    decisions = result.image_decisions
    assert decisions[1] == "review" and "mark" in result.per_image[1][0].reasons[0]
    assert decisions[2] == "refuse"  # asked for a 0: refused, whatever else matched
    assert decisions[4] == "review" and result.per_image[4][0].reasons[-1].startswith("product")
    assert decisions[5] == "pass" and result.decision == "refuse"
    # the default policy: marks and the quality bar
    default = build_stage([FilterSpec(name="policy")], context)
    clean = default(images[:20], Conditioning({"labels": labels[:20]}))
    assert pass_rate([clean]) >= 0.9
    marked = default(stamp(images[:20], "bar"), Conditioning({"labels": labels[:20]}))
    assert pass_rate([marked]) == 0.0


def test_specs_are_checked_and_filters_register_by_name():
    with pytest.raises(ValueError, match="allowed values: quality, policy"):
        FilterSpec(name="nsfw")
    with pytest.raises(ValueError, match="equals or contains"):
        FilterSpec(name="policy", options={"rules": [{"kind": "conditioning", "key": "labels"}]})
    with pytest.raises(ValueError, match="kind"):
        FilterSpec(name="policy", options={"rules": [{"kind": "watermark"}]})
    with pytest.raises(InvalidArgumentError, match="needs a classifier"):
        build_stage([FilterSpec(name="quality")])

    class Dark:
        name, version = "dark", "2"

        def __call__(self, images, plan):
            return [
                FilterDecision("dark", "2", "review" if img.float().mean() < 1 else "pass")
                for img in images
            ]

        def describe(self):
            return {"name": "dark", "version": "2"}

    from pydantic import BaseModel

    class NoOptions(BaseModel):
        pass

    register_filter("dark", NoOptions, lambda options, context: Dark())
    try:
        stage = build_stage([FilterSpec(name="dark")])
        x = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
        x[0] = 200
        assert stage(x, Conditioning()).image_decisions == ["pass", "review", "review"]
        assert stage.versions() == [{"name": "dark", "version": "2"}]
        with pytest.raises(InvalidArgumentError, match="already registered"):
            register_filter("dark", NoOptions, lambda o, c: Dark())
    finally:
        FILTERS.pop("dark")


def test_stage_combines_and_checks_its_filters():
    assert most_severe(["pass", "review", "pass"]) == "review"
    assert most_severe(["review", "refuse"]) == "refuse" and most_severe([]) == "pass"

    class Short:
        name, version = "short", "1"

        def __call__(self, images, plan):
            return []

        def describe(self):
            return {}

    with pytest.raises(InvalidArgumentError, match="0 decisions for 2 images"):
        FilterStage([Short()])(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), Conditioning())
    with pytest.raises(InvalidArgumentError, match="uint8"):
        FilterStage([Short()])(torch.zeros(2, 1, 4, 4), Conditioning())


def test_review_queue_bounds_retention_and_decisions():
    from difforge.serving.idempotency import StoredResponse
    from difforge.serving.review import Held, ReviewError, ReviewQueue, ReviewQueueConfig

    now, expired = [0.0], []
    q = ReviewQueue(ReviewQueueConfig(max_items=2, max_bytes=100, retention_s=10), expired.append)
    q.clock = lambda: now[0]

    def held(rid, size=10):
        return Held(rid, "k", StoredResponse(b"x" * size, "image/png"), [], "v1", 0.0, 0.0)

    q.hold(held("a"))
    q.hold(held("b"))
    with pytest.raises(ReviewError, match="full") as e:
        q.hold(held("c"))
    assert e.value.reason == "review_full"
    q.reject("a", "ops")
    with pytest.raises(ReviewError, match="larger"):
        q.hold(held("big", 101))
    with pytest.raises(ReviewError, match="full"):
        q.hold(held("c", 95))  # 10 + 95 bytes > 100
    q.hold(held("c", 90))
    q.approve("b", "ops")
    with pytest.raises(ReviewError) as e:
        q.approve("b", "ops")
    assert e.value.reason == "review_conflict"
    assert [h.request_id for h in q.list()] == ["c"] and len(q.list(None)) == 2
    now[0] = 10.0  # retention: both expire, approved or not
    assert q.get("b") is None and len(q) == 0 and {h.request_id for h in expired} == {"b", "c"}
    with pytest.raises(ReviewError) as e:
        q.reject("c", "ops")
    assert e.value.reason == "not_found"
