"""The exact result cache: identical fully-resolved requests are answered without sampling.

A request's output is a pure function of its model version and its resolved parameters
(`Plan.params()`: seeds, conditioning, sampler, steps, guidance, grid, options, edit inputs,
adapter, response format), because every image has its own seeded noise and batching never
changes a sample (difforge.serving.invariance). So the decoded pixels of a finished request can
answer the next request with the same key byte for byte. The cache stores pixels, not response
bytes: the response is re-encoded with the new request's id and time (PNG text and JSON carry
both), which costs an encode and no sampler call.

Keys are (tenant, sha256 of the canonical JSON of version id + params). With `per_tenant` the
tenant is the caller's API key id, so one tenant's requests never answer another's. Entries are
evicted least recently used first once their pixels exceed `max_bytes`, and expire `ttl_s`
seconds after they were stored. A request whose seed was drawn at random is neither looked up
nor stored (its seeds are new; see `Plan.seed_drawn`).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from difforge.common.hashchain import canonical_json, sha256_text

CacheKey = tuple[str, str]  # (tenant, sha256 hex of version id + resolved params)


def result_key(tenant: str, version_id: str, params: Mapping[str, Any]) -> CacheKey:
    """The cache key of a request for `version_id` with resolved `params` (Plan.params())."""
    text = canonical_json({"version": version_id, "params": dict(params)}, allow_nan=True)
    return tenant, sha256_text(text)


@dataclass(frozen=True)
class CachedResult:
    """What a finished request leaves behind: its uint8 (C, H, W) images and the sampler-call
    facts its response reports (nfe, real images per call), so a hit answers the same bytes."""

    images: tuple[Tensor, ...]
    nfe: int
    call_images: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return sum(img.numel() * img.element_size() for img in self.images)


@dataclass
class _Entry:
    result: CachedResult
    stored: float  # clock() when it was put


class ResultCache:
    """A thread-safe LRU map CacheKey -> CachedResult bounded by the bytes of its pixels.

    Args:
        max_bytes: total pixel bytes kept; 0 turns the cache off (every get misses, put keeps
            nothing). A result larger than this is never kept.
        ttl_s: seconds an entry answers after it was stored (None: until evicted).
        clock: seconds, monotonic (injected by tests).
        on_evict: called with "bytes" or "ttl" for each entry dropped (metrics).
    """

    def __init__(
        self,
        max_bytes: int = 0,
        ttl_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_evict: Callable[[str], None] | None = None,
    ):
        self.max_bytes, self.ttl_s = max_bytes, ttl_s
        self._clock, self._on_evict = clock, on_evict
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    @property
    def nbytes(self) -> int:
        """Pixel bytes held now."""
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: CacheKey) -> CachedResult | None:
        """The result stored under `key` (now the most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if self._expired(entry, self._clock()):
                self._drop(key, "ttl")
                return None
            self._entries.move_to_end(key)
            return entry.result

    def put(self, key: CacheKey, result: CachedResult) -> None:
        """Store `result` under `key`, evicting expired, then least recently used entries."""
        size = result.nbytes
        if not self.enabled or size > self.max_bytes:
            return
        with self._lock:
            now = self._clock()
            if key in self._entries:
                self._drop(key, None)
            for stale in [k for k, e in self._entries.items() if self._expired(e, now)]:
                self._drop(stale, "ttl")
            while self._entries and self._bytes + size > self.max_bytes:
                self._drop(next(iter(self._entries)), "bytes")
            self._entries[key] = _Entry(result, now)
            self._bytes += size

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _expired(self, entry: _Entry, now: float) -> bool:
        return self.ttl_s is not None and now - entry.stored >= self.ttl_s

    def _drop(self, key: CacheKey, reason: str | None) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.result.nbytes
        if reason is not None and self._on_evict is not None:
            self._on_evict(reason)


__all__ = ["CacheKey", "CachedResult", "ResultCache", "result_key"]
