"""Pydantic validation errors as people read them: one line for a CLI or a log, or the
FastAPI-style field list (`[{"loc": ["body", "steps"], "msg": ..., "type": ...}]`) for HTTP.

    steps: Input should be greater than or equal to 1; sampler: unknown sampler 'x'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from pydantic import ValidationError

_VALUE_ERROR = "Value error, "  # pydantic's prefix on a ValueError raised by a validator


def error_details(e: ValidationError, *, prefix: Sequence[str | int] = ()) -> list[dict[str, Any]]:
    """FastAPI-style field errors: `loc` (with `prefix` in front, e.g. ("body",)), `msg`, `type`."""
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in e.errors()
    ]


def details_line(details: Iterable[Mapping[str, Any]], *, root: str = "") -> str:
    """Field errors joined into one line, `loc.path: msg; ...`; an empty `loc` reads as `root`."""
    parts = []
    for d in details:
        where = ".".join(map(str, d["loc"])) or root
        msg = str(d["msg"]).removeprefix(_VALUE_ERROR)
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts)


def error_line(
    e: ValidationError,
    *,
    root: str = "config",
    allowed: Iterable[str] | None = None,
    noun: str = "field",
) -> str:
    """A ValidationError as one readable line naming every bad field.

    Args:
        e: the error.
        root: what an error about the whole object is attributed to ("config").
        allowed: when given, an unknown key reads "unknown <noun> 'x' (allowed: a, b)".
        noun: what a key is called in that message ("field", "gate").
    """
    known = ", ".join(allowed) if allowed is not None else None
    parts = []
    for d in error_details(e):
        if known is not None and d["type"] == "extra_forbidden":
            where = ".".join(map(str, d["loc"]))
            parts.append(f"unknown {noun} {where!r} (allowed: {known})")
        else:
            parts.append(details_line([d], root=root))
    return "; ".join(parts)


def readable(e: BaseException) -> str:
    """One line for any error: `error_line` for a ValidationError, else its text or its type."""
    if isinstance(e, ValidationError):
        return error_line(e)
    return str(e) or type(e).__name__
