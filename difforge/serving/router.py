"""Which model version answers a request: a production version, optionally a canary with a share
of the traffic, and swaps that never fail a request.

A request is routed once, when it is accepted, and keeps a reference to its `ModelVersion` until it
is answered; a swap only changes which version *new* requests get, so requests already queued or
running finish on the version they started with. A version is installed only after it has been
loaded and warmed up (the service does that before calling `swap`/`set_canary`).

The canary share is stable: the routing key (API key id + seed, or the request id when no seed was
given) is hashed to a number in [0, 1), and requests under `share` go to the canary. The same key
and seed always reach the same version for a given share.

At most one "fast" version (a distilled student of production, difforge.training.distill) can be
installed beside them; it answers requests that ask for it (`route: "fast"`), with its own sampling
defaults, and is the circuit breaker's cheap route while it is open (difforge.serving.fallback); it
never takes a share of the others' traffic. `check_fast` is the one check that it may: here, when
it is installed (`difforge serve --fast PATH`, `await service.install(model, "fast")`, or the
registry's newest student of production with `difforge serve --registry`).

`await service.install(model, role=...)` warms a version, then calls the methods below;
difforge.serving.registry_source drives it from the registry's production and canary aliases.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from typing import Literal

from difforge.core.errors import InvalidArgumentError
from difforge.pipeline import Model
from difforge.serving.batching import BatchPlan

Role = Literal["production", "canary", "fast"]


@dataclass(eq=False)
class ModelVersion:
    """A loaded model as the service holds it."""

    model: Model
    plan: BatchPlan | None = None  # set by warm-up; None: not ready
    warmup_seconds: float | None = None
    meta: dict = field(default_factory=dict)

    @property
    def id(self) -> str:
        """Short version id used in batch keys and metric labels: the weights' sha256 prefix."""
        return self.model.sha256[:12]

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def ready(self) -> bool:
        return self.plan is not None

    def describe(self) -> dict:
        m = self.model
        return {
            "name": self.name,
            "version": self.id,
            "sha256": m.sha256,
            "num_classes": m.num_classes,
            # the keys as the page needs them (a text key's tokenizer JSON stays in the model)
            "conditioning": m.spec.model_dump(exclude={"keys": {"__all__": {"tokenizer"}}})["keys"],
            "image_shape": list(m.image_shape),
            "defaults": m.sampling.model_dump(),
            "ready": self.ready,
            "batching": None if self.plan is None else self.plan.describe(),
            **({"registry": dict(self.meta)} if self.meta else {}),
            "adapters": [a.describe() for a in getattr(m, "adapters", {}).values()],
        }


def routing_fraction(routing_key: str) -> float:
    """A stable number in [0, 1) for a routing key (first 8 bytes of its sha256)."""
    digest = hashlib.sha256(routing_key.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_compatible(a: Model, b: Model) -> None:
    """Versions served side by side must accept the same requests."""
    if a.spec != b.spec or tuple(a.image_shape) != tuple(b.image_shape):
        raise InvalidArgumentError(
            f"model {b.name!r} (conditioning {b.spec.names}, {b.num_classes} classes, shape "
            f"{tuple(b.image_shape)}) cannot serve beside {a.name!r} (conditioning "
            f"{a.spec.names}, {a.num_classes} classes, shape {tuple(a.image_shape)})"
        )


def check_fast(production: Model, student: Model) -> None:
    """The fast version must be a distilled student of production that accepts its requests.

    Raises:
        InvalidArgumentError: it is no student of `production`, or serves other requests.
    """
    from difforge.pipeline.students import check_student_of

    check_student_of(student, production)
    check_compatible(production, student)


def is_student(student: Model, production: Model) -> bool:
    """Whether `check_fast` lets `student` be the fast version beside `production`."""
    try:
        check_fast(production, student)
    except InvalidArgumentError:
        return False
    return True


class ModelRouter:
    """Holds the production version and an optional canary; thread-safe swaps.

    Args:
        production: the version that answers requests not sent to the canary.
        fast: a student of production answering `route: "fast"` requests and the breaker's
            cheap route (optional; warmed with production by the service's start).
    """

    def __init__(self, production: ModelVersion, fast: ModelVersion | None = None):
        self._lock = threading.Lock()
        self._production = production
        self._canary: ModelVersion | None = None
        self._share = 0.0
        if fast is not None:
            check_fast(production.model, fast.model)
        self._fast = fast

    @property
    def production(self) -> ModelVersion:
        return self._production

    @property
    def canary(self) -> ModelVersion | None:
        return self._canary

    @property
    def canary_share(self) -> float:
        return self._share

    def versions(self) -> list[tuple[Role, ModelVersion]]:
        with self._lock:
            out: list[tuple[Role, ModelVersion]] = [("production", self._production)]
            if self._canary is not None:
                out.append(("canary", self._canary))
            if self._fast is not None:
                out.append(("fast", self._fast))
            return out

    @property
    def fast(self) -> ModelVersion | None:
        return self._fast

    def set_fast(self, version: ModelVersion | None) -> None:
        """Make a ready student of production the fast version; None removes the fast route."""
        if version is not None:
            self._require_ready(version)
            check_fast(self._production.model, version.model)
        with self._lock:
            self._fast = version

    def model_for(self, route: str | None) -> Model | None:
        """The model a request on `route` is resolved against (its defaults); None: no such route."""
        if route != "fast":
            return self._production.model
        fast = self._fast
        return None if fast is None else fast.model

    def route(
        self, routing_key: str, adapter: str | None = None, route: str | None = None
    ) -> tuple[Role, ModelVersion]:
        """The version for a request with this routing key (and LoRA adapter, if it names one;
        and its `route` field: "fast" is the student).

        Each version serves its own adapters (an adapter is tied to one base); a request naming
        an adapter the canary does not hold stays on production, which the resolver checked."""
        with self._lock:
            prod, canary, share, fast = self._production, self._canary, self._share, self._fast
        if route == "fast":
            if fast is None:
                raise InvalidArgumentError("this service has no fast route (no student installed)")
            return "fast", fast
        has = canary is not None and (adapter is None or adapter in canary.model.adapters)
        if has and routing_fraction(routing_key) < share:
            return "canary", canary
        return "production", prod

    def swap(self, version: ModelVersion) -> ModelVersion:
        """Make a ready `version` production; returns the old one (still finishing its requests).

        A fast version that is no student of the new production leaves with the old one."""
        self._require_ready(version)
        with self._lock:
            check_compatible(self._production.model, version.model)
            old, self._production = self._production, version
            if self._fast is not None and not is_student(self._fast.model, version.model):
                self._fast = None
        return old

    def set_canary(self, version: ModelVersion | None, share: float = 0.0) -> None:
        """Send `share` of the traffic (0..1) to a ready `version`; None removes the canary."""
        if not 0.0 <= share <= 1.0:
            raise InvalidArgumentError(f"canary share must be in [0, 1], got {share}")
        if version is not None:
            self._require_ready(version)
            check_compatible(self._production.model, version.model)
        with self._lock:
            self._canary, self._share = version, (share if version is not None else 0.0)

    def promote_canary(self) -> ModelVersion:
        """The canary becomes production (all traffic); returns the old production version."""
        with self._lock:
            if self._canary is None:
                raise InvalidArgumentError("there is no canary to promote")
            old, self._production = self._production, self._canary
            self._canary, self._share = None, 0.0
            if self._fast is not None and not is_student(self._fast.model, self._production.model):
                self._fast = None
        return old

    @staticmethod
    def _require_ready(version: ModelVersion) -> None:
        if not version.ready:
            raise InvalidArgumentError(
                f"model version {version.id} is not warmed up; install it through the service"
            )
