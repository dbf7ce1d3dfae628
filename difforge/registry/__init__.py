"""difforge.registry: model versions with provenance, aliases, quality-gated promotion, audit.

Serving asks `Registry.resolve(name)` which versions are production and canary (with the
canary's share of traffic), loads each with `Registry.load_version`, and demotes a canary with
`Registry.auto_rollback_canary` when `should_rollback` says it does worse than production.
"""

from difforge.registry.adapters import (
    AdapterInfo,
    AdapterRegistration,
    current_adapters,
    list_adapters,
    push_adapter,
)
from difforge.registry.audit import AuditEntry
from difforge.registry.canary import RollbackMargins, WindowStats, should_rollback
from difforge.registry.config import DEFAULT_URL, Gates, RegistryConfig, parse_gates
from difforge.registry.errors import (
    ArtifactIntegrityError,
    ConflictError,
    GateFailedError,
    NotFoundError,
    RegistryError,
)
from difforge.registry.gates import GateResult, ReportSummary, check_gates, summarize_report
from difforge.registry.registry import Registry
from difforge.registry.types import (
    Promotion,
    Registration,
    Resolution,
    VerifyReport,
    VersionInfo,
)

__all__ = [
    "DEFAULT_URL",
    "AdapterInfo",
    "AdapterRegistration",
    "ArtifactIntegrityError",
    "AuditEntry",
    "ConflictError",
    "GateFailedError",
    "GateResult",
    "Gates",
    "NotFoundError",
    "Promotion",
    "Registration",
    "Registry",
    "RegistryConfig",
    "RegistryError",
    "ReportSummary",
    "Resolution",
    "RollbackMargins",
    "VerifyReport",
    "VersionInfo",
    "WindowStats",
    "check_gates",
    "current_adapters",
    "list_adapters",
    "parse_gates",
    "push_adapter",
    "should_rollback",
    "summarize_report",
]
