"""`Idempotency-Key`: a retried request is answered once.

Per (key id, Idempotency-Key): the first request claims the entry; while it runs, a duplicate gets
409; after it succeeds, a retry with the same body gets the stored response byte for byte (no
recomputation, header `Idempotent-Replayed: true`); the same key with a different body gets 422.
A failed request releases its claim, so a retry computes afresh. Entries expire after `ttl_s` and
the oldest are evicted beyond `max_entries` (an in-flight entry is never evicted).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

from difforge.common.hashchain import canonical_json, sha256_text
from difforge.core.errors import DifforgeError


class IdempotencyConflict(DifforgeError):
    """reason "idempotency_conflict" (the first request with this key is still running) or
    "idempotency_mismatch" (the key was used with a different body)."""

    def __init__(self, reason: str, message: str):
        self.reason = reason
        super().__init__(message)


@dataclass(frozen=True)
class StoredResponse:
    """A successful answer (images, or 202 for an output held for review), as stored for an
    Idempotency-Key replay."""

    body: bytes
    media_type: str
    headers: dict[str, str] = field(default_factory=dict)
    status: int = 200


@dataclass
class _Entry:
    fingerprint: str
    created: float
    response: StoredResponse | None = None  # None: still running


def body_fingerprint(body: bytes) -> str:
    """sha256 of the body's canonical JSON (key order and spacing do not matter), else raw bytes."""
    try:
        return sha256_text(
            canonical_json(json.loads(body or b"{}"), ascii_only=True, allow_nan=True)
        )
    except (ValueError, RecursionError):
        return hashlib.sha256(body).hexdigest()


class IdempotencyStore:
    """Thread-safe map (key id, Idempotency-Key) -> claim or stored response."""

    def __init__(self, max_entries: int = 1024, ttl_s: float = 3600.0, clock=time.monotonic):
        self._entries: OrderedDict[tuple[str, str], _Entry] = OrderedDict()
        self._max, self._ttl, self._clock = max_entries, ttl_s, clock
        self._lock = threading.Lock()

    def claim(self, owner: str, key: str, body: bytes) -> StoredResponse | None:
        """Claim `key` for a new request (None), or return the stored response of a retry.

        Raises:
            IdempotencyConflict: "idempotency_conflict" while the first request runs,
                "idempotency_mismatch" for a different body.
        """
        fp = body_fingerprint(body)
        now = self._clock()
        with self._lock:
            self._expire(now)
            entry = self._entries.get((owner, key))
            if entry is None:
                self._entries[(owner, key)] = _Entry(fp, now)
                self._evict()
                return None
            if entry.fingerprint != fp:
                raise IdempotencyConflict(
                    "idempotency_mismatch",
                    "Idempotency-Key was already used with a different request body",
                )
            if entry.response is None:
                raise IdempotencyConflict(
                    "idempotency_conflict", "a request with this Idempotency-Key is in progress"
                )
            return entry.response

    def complete(self, owner: str, key: str, response: StoredResponse) -> None:
        with self._lock:
            entry = self._entries.get((owner, key))
            if entry is not None:
                entry.response = response

    def release(self, owner: str, key: str) -> None:
        """Forget a claim whose request failed, so that a retry runs again."""
        with self._lock:
            entry = self._entries.get((owner, key))
            if entry is not None and entry.response is None:
                del self._entries[(owner, key)]

    def _expire(self, now: float) -> None:
        stale = [
            k
            for k, e in self._entries.items()
            if e.response is not None and now - e.created > self._ttl
        ]
        for k in stale:
            del self._entries[k]

    def _evict(self) -> None:
        for k in list(self._entries):
            if len(self._entries) <= self._max:
                break
            if self._entries[k].response is not None:
                del self._entries[k]
