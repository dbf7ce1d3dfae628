"""JSON round trips for the frozen config dataclasses of the nets (stored next to the weights)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, Self

from difforge.core.errors import InvalidArgumentError


class JsonConfig:
    """`to_dict` (tuples become lists) and `from_dict` (unknown keys refused, missing ones default)
    for a dataclass config."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict; `from_dict` inverts it."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)  # type: ignore[arg-type]
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Self:
        """Build from a dict such as `to_dict()` wrote."""
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(d) - names)
        if unknown:
            raise InvalidArgumentError(
                f"unknown {cls.__name__} keys {unknown}; allowed keys: {', '.join(sorted(names))}"
            )
        return cls(**dict(d))
