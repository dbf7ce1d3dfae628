"""The one request resolver and the conditioning spec: defaults, errors and replay, whatever edge
the request came from."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from difforge.pipeline import (
    ClassKey,
    ConditioningSpec,
    RequestInvalid,
    RequestLimits,
    SamplingDefaults,
    resolve,
)
from difforge.serving.config import Limits
from difforge.serving.protocol import RequestInvalid as BodyInvalid
from difforge.serving.protocol import parse_body
from difforge.serving.protocol import resolve as http_resolve

CLASSES = SimpleNamespace(
    spec=ConditioningSpec.for_classes(4, ("a", "b", "c", "d")),
    sampling=SamplingDefaults(sampler="ipndm", steps=7, guidance=2.5, grid="exponential"),
    image_shape=(1, 8, 8),
)
UNCOND = SimpleNamespace(
    spec=ConditioningSpec(), sampling=SamplingDefaults(guidance=3.0), image_shape=(1, 8, 8)
)


def test_defaults_come_from_the_model_and_the_spec():
    plan = resolve(CLASSES, {"seed": 10, "n": 6})
    assert (plan.sampler, plan.steps, plan.guidance, plan.grid) == ("ipndm", 7, 2.5, "exponential")
    assert plan.conditioning == {"labels": [0, 1, 2, 3, 0, 1]} and plan.seeds == tuple(
        range(10, 16)
    )
    assert [int(r["labels"]) for r in plan.rows] == [0, 1, 2, 3, 0, 1]
    assert resolve(CLASSES, {"labels": [3, None, 1]}).n == 3  # n from the conditioning list
    assert resolve(CLASSES, {"seeds": [5, 9]}).n == 2
    assert resolve(CLASSES, {}).n == 1


def test_a_missing_seed_is_random_and_reported():
    a, b = resolve(CLASSES, {"n": 3}), resolve(CLASSES, {"n": 3})
    assert a.seeds != b.seeds  # 2**-32 chance of a false failure
    assert a.seeds == (a.seeds[0], a.seeds[0] + 1, a.seeds[0] + 2) and a.seeds[0] < 2**32


def test_null_entries_are_the_null_class_and_replay_exactly():
    plan = resolve(CLASSES, {"labels": [None, 2], "seed": 1})
    assert [int(r["labels"]) for r in plan.rows] == [4, 2]  # 4 = the learned null class
    replay = resolve(CLASSES, json.loads(json.dumps(plan.params())))
    assert replay.params() == plan.params()
    assert all(
        torch.equal(x["labels"], y["labels"]) for x, y in zip(plan.rows, replay.rows, strict=True)
    )


def test_every_bad_field_is_reported_at_once():
    bad = {"labels": [9], "steps": 0, "sampler": "plms", "colour": 1, "seeds": [1, 2], "n": 3}
    with pytest.raises(RequestInvalid) as e:
        resolve(CLASSES, bad)
    fields = {p.loc[0] for p in e.value.problems}
    assert fields == {"labels", "steps", "sampler", "colour", "seeds"}
    assert "conditioning keys: labels" in str(e.value)
    assert e.value.errors(("body",))[0]["loc"][0] == "body"


def test_guidance_on_a_model_without_conditioning_is_an_error_not_silently_one():
    assert resolve(UNCOND, {}).guidance == 1.0  # the model's default 3 does not apply
    with pytest.raises(RequestInvalid, match="guidance must be 1"):
        resolve(UNCOND, {"guidance": 2.0})
    with pytest.raises(RequestInvalid, match="model is unconditional"):
        resolve(UNCOND, {"labels": [1]})


@pytest.mark.parametrize(
    ("options", "ok"),
    [
        ({"max_order": 3}, True),
        ({"max_order": 2.5}, False),  # an int knob takes an integer
        ({"max_order": True}, False),  # a bool is not an integer
        ({"eta": 0.5}, False),  # not a knob of ipndm
    ],
)
def test_sampler_options_keep_their_types(options, ok):
    if ok:
        assert dict(resolve(CLASSES, {"options": options}).options) == options
    else:
        with pytest.raises(RequestInvalid, match="options"):
            resolve(CLASSES, {"options": options})
    assert dict(resolve(CLASSES, {"sampler": "ddim", "options": {"eta": 1}}).options) == {
        "eta": 1.0
    }  # an int given to a float knob is a float


def test_http_bodies_and_library_dicts_resolve_to_the_same_plan():
    body = {"labels": [1, None], "seed": 4, "steps": 3, "options": {"max_order": 2}}
    limits = Limits(max_n=8)
    via_http = http_resolve(parse_body(json.dumps(body).encode(), limits), limits, CLASSES)
    assert via_http.params() == resolve(CLASSES, body).params()


@pytest.mark.parametrize("guidance", [False, True, "2"])
def test_guidance_must_be_a_json_number(guidance):
    limits = Limits(max_n=8)
    assert parse_body(b'{"guidance": 2}', limits).guidance == 2.0
    with pytest.raises(BodyInvalid) as e:
        parse_body(json.dumps({"guidance": guidance}).encode(), limits)
    assert e.value.errors[0]["loc"] == ["body", "guidance"]


def test_limits_bound_a_request():
    limits = RequestLimits(max_n=2, max_steps=5, min_guidance=0, max_guidance=4)
    with pytest.raises(RequestInvalid) as e:
        resolve(CLASSES, {"n": 3, "steps": 6, "guidance": 5}, limits)
    assert {p.loc[0] for p in e.value.problems} == {"n", "steps", "guidance"}


def test_a_spec_refuses_duplicate_keys_and_mismatched_names():
    key = ClassKey(num_classes=3)
    with pytest.raises(ValueError, match="unique"):
        ConditioningSpec(keys=(key, key))
    with pytest.raises(ValueError, match="class_names"):
        ClassKey(num_classes=3, class_names=("a",))


@given(st.lists(st.one_of(st.none(), st.integers(0, 3)), min_size=1, max_size=6))
def test_describe_inverts_resolve(values):
    spec = CLASSES.spec
    rows = spec.resolve({"labels": values}, len(values))
    assert [spec.describe(r)["labels"] for r in rows] == values
    batch = spec.collate(rows)
    assert batch["labels"].shape == (len(values),) and batch["labels"].dtype == torch.int64


def test_training_dropout_replaces_values_by_the_null_class_at_its_rate():
    spec = ConditioningSpec.for_classes(10, dropout=0.25)
    cond = spec.from_batch({"labels": torch.zeros(20_000, dtype=torch.int64)})
    dropped = spec.drop(cond, torch.Generator().manual_seed(0))["labels"]
    assert set(dropped.unique().tolist()) == {0, 10}
    assert abs(float((dropped == 10).float().mean()) - 0.25) < 0.01
