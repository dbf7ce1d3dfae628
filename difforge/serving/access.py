"""Who may call what, and how often.

Keys: `Authorization: Bearer <key>` (or `X-API-Key: <key>`). The service stores only sha256(key)
and compares digests in constant time; a principal carries the key *id*, which is what logs,
metrics and the audit log may see.

With no keys configured the service answers loopback clients only (the client is 127.0.0.0/8 or
::1; behind a reverse proxy on the same host every client looks local, so configure keys there),
except the two health routes, which answer anyone: they say only "live" and "ready", and a
health checker (a load balancer, the kubelet) probes from another host.

The client is the socket peer. X-Forwarded-For is believed only from the proxies listed in the
service config's `trusted_proxies` (none by default), never from uvicorn's proxy settings
(FORWARDED_ALLOW_IPS), which difforge turns off.
With keys: `generate` routes need a key with scope generate (missing or unknown -> 401 with no
detail, wrong scope -> 403); `/metrics` and admin routes need scope admin or a loopback client.

Rate limits are token buckets per key id (`per_second` refill, `burst` capacity); an empty bucket
is a 429 with Retry-After for that key only.
"""

from __future__ import annotations

import hmac
import ipaddress
import math
import threading
import time
from dataclasses import dataclass

from difforge.core.errors import DifforgeError
from difforge.serving.config import ApiKey, RateLimit, ServiceConfig, hash_key

ANONYMOUS = "loopback"  # the key id of keyless loopback clients (rate limits, audit)


class AccessDenied(DifforgeError):
    """reason "unauthorized" (no valid key) or "forbidden" (not allowed); `public_detail` is all
    the client is told."""

    def __init__(self, reason: str, public_detail: str):
        self.reason = reason  # also the metrics label
        self.public_detail = public_detail
        super().__init__(public_detail)


@dataclass(frozen=True)
class Principal:
    key_id: str  # ANONYMOUS for keyless loopback clients
    scopes: frozenset[str]
    loopback: bool

    def may(self, scope: str) -> bool:
        return scope in self.scopes


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


def _ip(host: str | None):
    try:
        return ipaddress.ip_address((host or "").strip().split("%")[0])
    except ValueError:
        return None


class ProxyTrust:
    """Who the client is: the socket peer, unless the peer is a configured trusted proxy; then
    the right-most X-Forwarded-For hop that is not itself a trusted proxy."""

    def __init__(self, trusted: tuple[str, ...]):
        self._nets = tuple(ipaddress.ip_network(n, strict=False) for n in trusted)

    def _trusted(self, host: str | None) -> bool:
        ip = _ip(host)
        return ip is not None and any(ip in net for net in self._nets)

    def client(self, peer: str | None, forwarded_for: list[str]) -> str | None:
        """The client's address, from the peer and every X-Forwarded-For header value."""
        if not self._trusted(peer):
            return peer
        hops = [h.strip() for value in forwarded_for for h in value.split(",") if h.strip()]
        for hop in reversed(hops):
            if not self._trusted(hop):
                return hop if _ip(hop) is not None else "invalid"  # never loopback
        return hops[0] if hops else peer


def presented_key(headers) -> str | None:
    """The API key in the request headers, if any (headers is a case-insensitive mapping)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, value = auth.partition(" ")
        return value.strip() if scheme.lower() == "bearer" and value.strip() else None
    key = headers.get("x-api-key")
    return key.strip() if key else None


class AccessControl:
    """Decides 401/403 for a request, from its headers and peer address."""

    def __init__(self, config: ServiceConfig):
        self._keys: tuple[ApiKey, ...] = config.api_keys

    @property
    def loopback_only(self) -> bool:
        return not self._keys

    def _lookup(self, key: str) -> ApiKey | None:
        digest = hash_key(key)
        found = None
        for entry in self._keys:  # compare against every entry: no early exit to time
            if hmac.compare_digest(entry.sha256, digest):
                found = entry
        return found

    def authorize(self, headers, host: str | None, scope: str) -> Principal:
        """The principal allowed to use `scope`, or AccessDenied.

        Args:
            headers: the request's headers.
            host: the peer's IP address.
            scope: "generate", "admin", or "any" (any valid key; loopback as for admin).
        """
        local = is_loopback(host)
        if self.loopback_only:
            if not local:
                raise AccessDenied("forbidden", "this service answers loopback clients only")
            return Principal(ANONYMOUS, frozenset({"generate", "admin"}), True)
        key = presented_key(headers)
        entry = self._lookup(key) if key else None
        loopback_ok = scope in ("admin", "any") and local
        if entry is None:
            if loopback_ok and not key:
                return Principal(ANONYMOUS, frozenset({"admin"}), True)
            raise AccessDenied("unauthorized", "unauthorized")
        principal = Principal(entry.id, frozenset(entry.scopes), local)
        if scope == "any" or principal.may(scope) or loopback_ok:
            return principal
        raise AccessDenied("forbidden", f"this key lacks the {scope!r} scope")


class RateLimiter:
    """Token buckets, one per key id."""

    def __init__(self, config: ServiceConfig, clock=time.monotonic):
        self._default = config.rate_limit
        self._per_key = {k.id: k.rate_limit for k in config.api_keys if k.rate_limit}
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last time)
        self._lock = threading.Lock()
        self._clock = clock

    def limit_for(self, key_id: str) -> RateLimit | None:
        return self._per_key.get(key_id, self._default)

    def acquire(self, key_id: str, cost: float = 1.0) -> float | None:
        """Take `cost` tokens; None if granted, else seconds until they will be there."""
        limit = self.limit_for(key_id)
        if limit is None:
            return None
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (float(limit.burst), now))
            tokens = min(float(limit.burst), tokens + (now - last) * limit.per_second)
            if tokens >= cost:
                self._buckets[key_id] = (tokens - cost, now)
                return None
            self._buckets[key_id] = (tokens, now)
            return (cost - tokens) / limit.per_second

    def refund(self, key_id: str, cost: float = 1.0) -> None:
        """Give back tokens taken by `acquire` for a request refused before any work."""
        limit = self.limit_for(key_id)
        if limit is None:
            return
        with self._lock:
            if key_id in self._buckets:
                tokens, last = self._buckets[key_id]
                self._buckets[key_id] = (min(float(limit.burst), tokens + cost), last)


def retry_after_header(seconds: float) -> str:
    """Retry-After takes whole seconds; round up so a client that obeys it succeeds."""
    return str(max(1, math.ceil(seconds)))
