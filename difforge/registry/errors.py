"""Typed errors of the model registry. Each message is one line a person can act on."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from difforge.core.errors import DifforgeError
from difforge.pipeline import ModelIntegrityError

if TYPE_CHECKING:
    from difforge.registry.gates import GateResult


class RegistryError(DifforgeError):
    """A registry operation cannot be carried out (bad reference, conflict, missing data)."""


class NotFoundError(RegistryError, LookupError):
    """A model name, version or alias does not exist in the registry."""


class ConflictError(RegistryError):
    """The request contradicts what is already registered (e.g. same weights, other config)."""


class ArtifactIntegrityError(RegistryError, ModelIntegrityError):
    """A stored artifact is missing, truncated or does not hash to its recorded sha256."""


class GateFailedError(RegistryError):
    """A promotion was refused because one or more quality gates failed; the alias is unchanged.

    Attributes:
        name, version, alias: what was to be promoted where.
        failures: the failed gates, each with its value, threshold and margin.
    """

    def __init__(self, name: str, version: int, alias: str, failures: Sequence[GateResult]):
        self.name, self.version, self.alias = name, version, alias
        self.failures = tuple(failures)
        reasons = "; ".join(f.message for f in self.failures)
        super().__init__(f"promotion of {name} v{version} to {alias} refused: {reasons}")
