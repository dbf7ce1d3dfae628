"""Cross-checks of the registry's tables against its audit log (the chain itself: audit.py).

Each version row's immutable columns are digested when it is registered and the digest is kept in
the register entry; each report is hashed into its report entry; alias entries carry the
aliases' new state, so replaying the log must give the aliases table exactly.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, select

from difforge.common.hashchain import canonical_json, sha256_text
from difforge.registry.audit import AuditEntry
from difforge.registry.schema import aliases, evaluation_reports

_IMMUTABLE = (
    "name",
    "version",
    "weights_sha256",
    "config_sha256",
    "files",
    "config",
    "dataset_hash",
    "code_version",
    "training_config",
    "training_metrics",
    "card",
    "source",
    "created_at",
    "created_by",
)


def row_digest(row: Mapping[str, Any]) -> str:
    return sha256_text(canonical_json({k: row[k] for k in _IMMUTABLE}))


def check_versions(rows, log: list[AuditEntry]) -> list[str]:
    recorded = {
        (e.name, e.version): e.details.get("row_sha256") for e in log if e.action == "register"
    }
    problems = []
    for row in rows:
        key = (row.name, row.version)
        if key not in recorded:
            problems.append(
                f"version {row.name} v{row.version} has no register entry in the audit log"
            )
        elif row_digest(row._mapping) != recorded[key]:
            problems.append(f"version {row.name} v{row.version} was edited after it was registered")
    return problems


def check_reports(conn: Connection, rows, log: list[AuditEntry]) -> list[str]:
    by_id = {r.id: r for r in rows}
    recorded = {
        (e.name, e.version, e.details.get("report_sha256")) for e in log if e.action == "report"
    }
    problems = []
    for rep in conn.execute(select(evaluation_reports).order_by(evaluation_reports.c.id)):
        v = by_id.get(rep.version_id)
        where = f"evaluation report {rep.id}" + ("" if v is None else f" of {v.name} v{v.version}")
        if sha256_text(rep.report) != rep.sha256:
            problems.append(f"{where} was edited: its text no longer hashes to its recorded sha256")
        elif v is None or (v.name, v.version, rep.sha256) not in recorded:
            problems.append(f"{where} has no report entry in the audit log")
    return problems


def check_aliases(conn: Connection, log: list[AuditEntry]) -> list[str]:
    replayed: dict[tuple[str, str], tuple[int, float | None]] = {}
    for e in log:
        for alias, state in (e.details.get("aliases") or {}).items():
            if state is None:
                replayed.pop((e.name, alias), None)
            else:
                replayed[(e.name, alias)] = (state["version"], state.get("percent"))
    stored = {(r.name, r.alias): (r.version, r.percent) for r in conn.execute(select(aliases))}
    problems = []
    for key in sorted(set(replayed) | set(stored)):
        if replayed.get(key) != stored.get(key):
            shown = stored.get(key, ("(none)",))[0]
            expected = replayed.get(key, ("(none)",))[0]
            problems.append(
                f"alias {key[1]} of {key[0]} points at v{shown} but the audit log says v{expected}"
            )
    return problems
