"""The audit log: an append-only chain where each entry's hash covers the previous entry's hash.

hash_n = sha256(canonical JSON of {seq, at, actor, action, name, version, details, prev_hash_(n-1)})

Editing any field of any row breaks that row's hash; deleting or reordering rows breaks the
links after it (the chain itself: `difforge.common.hashchain`, format `CHAIN`). Entries are only ever inserted, under the registry's write lock, so the chain
stays linear; on SQLite and PostgreSQL a trigger also refuses UPDATE and DELETE. Someone who can
rewrite the whole chain can hide an edit from `verify_chain` alone: publish `head` (the last
hash) somewhere else to anchor it.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Connection, func, select

from difforge.common.hashchain import GENESIS, ChainFormat, Link, canonical_json, verify
from difforge.registry.schema import audit_log

# On PostgreSQL every change to a model is also announced on this channel (payload: the model
# name), delivered when its transaction commits: services LISTEN to follow at once
NOTIFY_CHANNEL = "difforge_registry"
# the previous hash is hashed inside the entry's JSON; strict, UTF-8 canonical JSON
CHAIN = ChainFormat(prev_key="prev_hash")
_CONTENT = ("seq", "at", "actor", "action", "name", "version", "details")


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds")


def default_actor() -> str:
    """Who is acting: $DIFFORGE_ACTOR, else the login name."""
    try:
        return os.environ.get("DIFFORGE_ACTOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


@dataclass(frozen=True)
class AuditEntry:
    """One row of the audit log."""

    seq: int
    at: str
    actor: str
    action: str  # register, report, promote, promotion_refused, rollback, alias_set, ...
    name: str | None
    version: int | None
    details: dict[str, Any]
    prev_hash: str
    hash: str


def entry_hash(
    seq: int,
    at: str,
    actor: str,
    action: str,
    name: str | None,
    version: int | None,
    details: str,
    prev_hash: str,
) -> str:
    """The chain hash of one entry; `details` is the stored canonical JSON text."""
    content = dict(zip(_CONTENT, (seq, at, actor, action, name, version, details), strict=True))
    return CHAIN.hash(prev_hash, content)


def append(
    conn: Connection,
    action: str,
    *,
    actor: str,
    name: str | None = None,
    version: int | None = None,
    details: Mapping[str, Any] | None = None,
) -> AuditEntry:
    """Add one entry at the end of the chain. Call inside a registry write transaction."""
    last = conn.execute(
        select(audit_log.c.seq, audit_log.c.hash).order_by(audit_log.c.seq.desc()).limit(1)
    ).first()
    seq, prev = (last.seq + 1, last.hash) if last else (1, GENESIS)
    at, text = now(), canonical_json(dict(details or {}))
    digest = entry_hash(seq, at, actor, action, name, version, text, prev)
    row = {
        "seq": seq,
        "at": at,
        "actor": actor,
        "action": action,
        "name": name,
        "version": version,
        "details": text,
        "prev_hash": prev,
        "hash": digest,
    }
    conn.execute(audit_log.insert().values(**row))
    if name is not None and conn.dialect.name == "postgresql":
        conn.execute(select(func.pg_notify(NOTIFY_CHANNEL, name)))
    return AuditEntry(**{**row, "details": dict(details or {})})


def _entry(row) -> AuditEntry:
    try:
        details = json.loads(row.details)
    except (TypeError, ValueError):
        details = {"unparsable": str(row.details)}
    return AuditEntry(
        row.seq,
        row.at,
        row.actor,
        row.action,
        row.name,
        row.version,
        details,
        row.prev_hash,
        row.hash,
    )


def entries(
    conn: Connection, name: str | None = None, limit: int | None = None
) -> list[AuditEntry]:
    """Audit entries in order (oldest first), optionally one model's, optionally the last `limit`."""
    q = select(audit_log)
    if name is not None:
        q = q.where(audit_log.c.name == name)
    q = q.order_by(audit_log.c.seq.desc())
    if limit is not None:
        q = q.limit(limit)
    return [_entry(r) for r in reversed(conn.execute(q).all())]


def verify_chain(conn: Connection) -> tuple[list[str], int, str]:
    """Walk the chain; returns (every problem found, number of entries, head hash)."""
    rows = conn.execute(select(audit_log).order_by(audit_log.c.seq))
    links = (
        Link(r.seq, r.prev_hash, r.hash, {c: getattr(r, c) for c in _CONTENT}, r.action)
        for r in rows
    )
    report = verify(links, CHAIN, noun="audit entry", plural="audit entries")
    return [p.message for p in report.problems], report.rows, report.head


def last_seq(conn: Connection) -> int:
    return conn.scalar(select(func.max(audit_log.c.seq))) or 0
