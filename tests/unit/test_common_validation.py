"""The one pydantic-error formatter: a readable line, and FastAPI-style field details."""

from __future__ import annotations

import pytest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from difforge.common.validation import details_line, error_details, error_line, readable


class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rate: float = Field(1.0, gt=0)


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    steps: int = Field(10, ge=1)
    name: str = "m"
    inner: Inner = Field(default_factory=Inner)

    @field_validator("name")
    @classmethod
    def _no_spaces(cls, v: str) -> str:
        if " " in v:
            raise ValueError("no spaces allowed")
        return v

    @model_validator(mode="after")
    def _whole(self):
        if self.steps == 7:
            raise ValueError("7 steps is unlucky")
        return self


def _error(**data) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    return info.value


def test_one_line_names_every_bad_field_with_its_path():
    e = _error(steps=0, name="a b", inner={"rate": -1})
    line = error_line(e)
    assert line.split("; ") == [
        "steps: Input should be greater than or equal to 1",
        "name: no spaces allowed",  # pydantic's "Value error, " prefix is dropped
        "inner.rate: Input should be greater than 0",
    ]


def test_an_error_about_the_whole_object_reads_as_the_root():
    assert error_line(_error(steps=7)) == "config: 7 steps is unlucky"
    assert error_line(_error(steps=7), root="gates") == "gates: 7 steps is unlucky"


def test_unknown_keys_can_list_the_allowed_ones():
    e = _error(stpes=3)
    assert error_line(e) == "stpes: Extra inputs are not permitted"
    allowed = error_line(e, allowed=Outer.model_fields, noun="option")
    assert allowed == "unknown option 'stpes' (allowed: steps, name, inner)"


def test_details_are_fastapi_shaped_and_round_trip_to_the_line():
    e = _error(steps=0, inner={"rate": -1})
    details = error_details(e, prefix=("body",))
    assert [d["loc"] for d in details] == [["body", "steps"], ["body", "inner", "rate"]]
    assert {d["type"] for d in details} == {"greater_than_equal", "greater_than"}
    assert all(isinstance(d["msg"], str) for d in details)
    assert details_line(details) == (
        "body.steps: Input should be greater than or equal to 1; "
        "body.inner.rate: Input should be greater than 0"
    )


def test_readable_formats_validation_errors_and_passes_others_through():
    assert readable(_error(steps=0)) == "steps: Input should be greater than or equal to 1"
    assert readable(FileNotFoundError("no such file: x")) == "no such file: x"
    assert readable(ValueError()) == "ValueError"
