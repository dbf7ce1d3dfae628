"""What the registry hands out: versions, registrations, promotions, routing, verification."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from difforge.registry.gates import GateResult, ReportSummary


@dataclass(frozen=True)
class VersionInfo:
    """One registered version, as stored: identity, provenance, aliases and report summaries."""

    name: str
    version: int
    weights_sha256: str
    config_sha256: str
    files: dict[str, str]  # file name -> sha256 of the stored blob
    config: dict[str, Any]  # the model's config.json
    dataset_hash: str | None
    code_version: str | None
    training_config: dict[str, Any] | None
    training_metrics: dict[str, Any]
    card: str
    source: str | None
    created_at: str
    created_by: str
    aliases: tuple[str, ...] = ()
    reports: tuple[ReportSummary, ...] = ()  # oldest first; the gates read the last

    @property
    def ref(self) -> str:
        return f"{self.name}:v{self.version}"

    @property
    def metrics(self) -> dict[str, float]:
        """The latest evaluation report's metrics (empty when there is none)."""
        return dict(self.reports[-1].metrics) if self.reports else {}

    def to_dict(self, *, card: bool = False) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("reports", "card")}
        d["aliases"] = list(self.aliases)
        d["reports"] = [r.to_dict() for r in self.reports]
        if card:
            d["card"] = self.card
        return d


@dataclass(frozen=True)
class Registration:
    """What `register` did: the version, whether it is new, and how many reports it attached."""

    info: VersionInfo
    created: bool
    reports_added: int

    @property
    def version(self) -> int:
        return self.info.version


@dataclass(frozen=True)
class Promotion:
    """A promotion that went through: the version, the alias, what it replaced, each gate."""

    info: VersionInfo
    alias: str
    previous: int | None
    gates: tuple[GateResult, ...]
    changed: bool = True  # False when the alias already pointed there


@dataclass(frozen=True)
class Resolution:
    """Which versions of a model serve traffic now. `revision` grows with every change to it."""

    name: str
    production: VersionInfo | None
    canary: VersionInfo | None
    canary_percent: float  # share of traffic for the canary, 0-100 (0 when there is none)
    revision: int  # the model's latest audit entry; poll and reload when it changes

    @property
    def canary_share(self) -> float:
        """The canary's share of traffic as a fraction in [0, 1]."""
        return self.canary_percent / 100.0

    def as_dict(self) -> dict[str, Any]:
        canary = None if self.canary is None else (self.canary, self.canary_percent)
        return {"production": self.production, "canary": canary}


@dataclass(frozen=True)
class VerifyReport:
    """The outcome of `Registry.verify`."""

    problems: list[str]
    audit_entries: int
    head: str  # hash of the last audit entry: record it elsewhere to anchor the chain
    artifacts_checked: int
    versions_checked: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems
