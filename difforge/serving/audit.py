"""An append-only audit log of generation requests in SQLite, with a hash chain.

Each row stores what was asked (the resolved parameters, enough to replay the request), by whom
(the API key *id*, never the key), on which model version, what came out (sha256 of the pixels),
the outcome and the latency. Row i's hash is sha256(previous hash + canonical JSON of row i) (the
chain: `difforge.common.hashchain`, format `CHAIN`), so editing, inserting or deleting any row
breaks a hash or a link and `verify` names every row where that happens.
Triggers refuse UPDATE and DELETE through SQLite itself; the chain catches whoever bypasses them.
Deleting the newest rows leaves a valid shorter chain: compare `head()` with a copy kept elsewhere.

Rejections that cost nothing (401/403/429/503) are counted in metrics, not written here.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from difforge.common.hashchain import GENESIS, ChainFormat, Link, verify

# the previous hash prefixes the row's JSON; ASCII-only, NaN allowed (as the first logs were written)
CHAIN = ChainFormat(prev_key=None, ascii_only=True, allow_nan=True)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    request_id TEXT NOT NULL,
    created TEXT NOT NULL,
    key_id TEXT,
    model_name TEXT,
    model_sha256 TEXT,
    role TEXT,
    status TEXT NOT NULL,
    http_status INTEGER NOT NULL,
    params TEXT NOT NULL,
    output_sha256 TEXT,
    latency_ms REAL NOT NULL,
    detail TEXT NOT NULL,
    prev_hash TEXT NOT NULL,
    hash TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_request_id ON audit (request_id);
CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
    BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
"""

_CONTENT = (
    "seq",
    "request_id",
    "created",
    "key_id",
    "model_name",
    "model_sha256",
    "role",
    "status",
    "http_status",
    "params",
    "output_sha256",
    "latency_ms",
    "detail",
)


@dataclass(frozen=True)
class AuditEntry:
    """What the service records about one request."""

    request_id: str
    status: str  # "ok", "invalid", "deadline_exceeded", "cancelled", "error"
    http_status: int
    params: dict[str, Any]  # resolved parameters (Plan.params()) or the raw body's fields
    latency_ms: float
    key_id: str | None = None
    model_name: str | None = None
    model_sha256: str | None = None
    role: str | None = None
    output_sha256: str | None = None
    detail: dict[str, Any] | None = None


@dataclass(frozen=True)
class Verification:
    """The chain check: `first_bad_seq` and `reason` describe the first problem, `problems` all."""

    ok: bool
    rows: int
    first_bad_seq: int | None = None
    reason: str = ""
    problems: tuple[str, ...] = ()


def _canonical(values: dict[str, Any]) -> str:
    return CHAIN.canonical(values)


def row_hash(prev_hash: str, content: dict[str, Any]) -> str:
    """sha256(prev_hash + canonical JSON of the row's content columns)."""
    return CHAIN.hash(prev_hash, content)


class AuditLog:
    """The audit table in the SQLite file `path` (":memory:" for a throw-away log). Thread-safe."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        last = self._db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        self._seq, self._head = (last["seq"], last["hash"]) if last else (0, GENESIS)

    def append(self, entry: AuditEntry) -> str:
        """Add one row; returns its hash (the new head of the chain)."""
        with self._lock:
            content = {
                "seq": self._seq + 1,
                "request_id": entry.request_id,
                "created": datetime.now(UTC).isoformat(timespec="milliseconds"),
                "key_id": entry.key_id,
                "model_name": entry.model_name,
                "model_sha256": entry.model_sha256,
                "role": entry.role,
                "status": entry.status,
                "http_status": int(entry.http_status),
                "params": _canonical(entry.params),
                "output_sha256": entry.output_sha256,
                "latency_ms": round(float(entry.latency_ms), 3),
                "detail": _canonical(entry.detail or {}),
            }
            digest = row_hash(self._head, content)
            cols = ", ".join((*_CONTENT, "prev_hash", "hash"))
            marks = ", ".join("?" * (len(_CONTENT) + 2))
            self._db.execute(
                f"INSERT INTO audit ({cols}) VALUES ({marks})",
                [content[c] for c in _CONTENT] + [self._head, digest],
            )
            self._seq, self._head = content["seq"], digest
            return digest

    def head(self) -> str:
        """The hash of the newest row (GENESIS when empty); keep a copy elsewhere to detect truncation."""
        with self._lock:
            return self._head

    def get(self, request_id: str) -> dict[str, Any] | None:
        """The newest row for `request_id`, with params and detail decoded, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM audit WHERE request_id = ? ORDER BY seq DESC LIMIT 1", (request_id,)
            ).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["params"], out["detail"] = json.loads(out["params"]), json.loads(out["detail"])
        return out

    def verify(self) -> Verification:
        """Recompute the chain; report every row whose hash or link does not hold."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM audit ORDER BY seq").fetchall()
        links = (
            Link(r["seq"], r["prev_hash"], r["hash"], {c: r[c] for c in _CONTENT}) for r in rows
        )
        report = verify(links, CHAIN)
        if report.ok:
            return Verification(True, report.rows)
        first = report.problems[0]
        messages = tuple(p.message for p in report.problems)
        return Verification(False, report.rows, first.seq, first.message, messages)

    def close(self) -> None:
        with self._lock:
            self._db.close()
