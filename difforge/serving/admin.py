"""The admin API's edge: request bodies in (POST /v1/admin/promote, /rollback, /canary), parsed
with field-level 422s, and registry errors out, as the ServiceError of an admin route.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from sqlalchemy.exc import SQLAlchemyError

from difforge.common.validation import error_details
from difforge.core.errors import InvalidArgumentError
from difforge.registry import ArtifactIntegrityError, GateFailedError, NotFoundError, RegistryError
from difforge.serving.protocol import RequestInvalid, field_error
from difforge.serving.service import ServiceError


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=True)


class PromoteBody(_Body):
    """POST /v1/admin/promote."""

    version: StrictInt | str  # 3, "v3", "latest" or an alias
    to: Literal["production", "canary"]
    gates: dict[str, Any] | None = None  # overrides of the registry's gates (Gates fields)
    percent: float | None = Field(None, ge=0, le=100)  # canary share; canary only (default 10)


class RollbackBody(_Body):
    """POST /v1/admin/rollback: the alias goes back to the version it had before."""

    alias: Literal["production", "canary"] = "production"
    reason: str | None = Field(None, max_length=500)


class CanaryBody(_Body):
    """POST /v1/admin/canary: a new canary version (gated), or only a new share of the traffic."""

    version: StrictInt | str | None = None  # None: keep the canary, change its percent
    percent: float = Field(ge=0, le=100)
    gates: dict[str, Any] | None = None  # with `version` only


def parse_admin(model: type[_Body], body: bytes) -> _Body:
    """Bytes -> an admin body, or RequestInvalid ("validation") with field-level messages."""
    try:
        return model.model_validate_json(body or b"{}")
    except ValidationError as e:
        raise RequestInvalid(error_details(e, prefix=("body",))) from None


@contextlib.contextmanager
def registry_errors() -> Iterator[None]:
    """Registry errors -> the ServiceError of an admin route (the registry's message as detail;
    the app maps the reason to a status)."""
    try:
        yield
    except GateFailedError as e:
        raise ServiceError("gate_failed", str(e)) from None
    except ArtifactIntegrityError as e:
        raise ServiceError("integrity_failure", str(e)) from None
    except NotFoundError as e:
        raise ServiceError("not_found", str(e)) from None
    except RegistryError as e:
        raise ServiceError("registry_conflict", str(e)) from None
    except InvalidArgumentError as e:
        raise ServiceError("validation", [field_error((), str(e))]) from None
    except SQLAlchemyError as e:
        first = str(getattr(e, "orig", None) or e).splitlines()[0]
        msg = f"registry database error: {first}"
        raise ServiceError("registry_unavailable", msg, retry_after=5.0) from None
