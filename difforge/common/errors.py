"""One formatter for pydantic validation errors: a readable line, or FastAPI-style detail."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


def format_validation_error(e: ValidationError, root: str = "value") -> str:
    """`loc.path: msg; other.loc: msg` (an empty location is named `root`)."""
    return "; ".join(
        f"{'.'.join(map(str, err['loc'])) or root}: {err['msg']}" for err in e.errors()
    )


def validation_detail(e: ValidationError, prefix: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """FastAPI's error shape: [{"loc": [*prefix, ...], "msg": ..., "type": ...}]."""
    return [
        {"loc": [*prefix, *err["loc"]], "msg": err["msg"], "type": err["type"]}
        for err in e.errors()
    ]
