"""The service configuration: typed, frozen, loaded from JSON (`difforge serve --config serve.json`).

Every limit a request is checked against lives here, with the queue, batching, rate-limit, access,
audit and deadline settings. API keys are stored as sha256 hex digests with a key id and scopes;
the key itself is never stored, logged or exported.

    {
      "limits": {"max_steps": 100, "max_n": 16, "max_batch_images": 8},
      "queue_size": 64,
      "batch_wait_ms": 10,
      "rate_limit": {"per_second": 5, "burst": 10},
      "api_keys": [{"id": "alice", "sha256": "<hex of sha256(key)>", "scopes": ["generate"]}],
      "audit_db": "audit.sqlite3",
      "registry": {"poll_s": 5, "window_s": 60, "margins": {"error_rate": 0.02}},
      "result_cache": {"max_bytes": 67108864, "ttl_s": 3600, "per_tenant": true},
      "filters": {"stage": [{"name": "policy"}], "on_review": "hold", "review": {"max_items": 64}},
      "drift": {"enabled": true, "window": 512, "interval_s": 30, "kid_max": 2000},
      "state": {"backend": "database", "url": "postgresql+psycopg://difforge@db/difforge"},
      "breaker": {"degrade": "allowed", "latency_slo_s": 2.0, "degraded_steps": 4}
    }
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from difforge.common.validation import error_line
from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.registry.canary import RollbackMargins
from difforge.serving.breaker import BreakerConfig
from difforge.serving.drift import DriftConfig
from difforge.serving.review import FiltersConfig

Scope = Literal["generate", "admin"]
InvarianceMode = Literal["pad", "chunk", "kernels", "per_sample", "off"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Limits(_Frozen):
    """What one request may ask for; a violation is a 422 that costs no queue slot."""

    max_steps: int = Field(100, ge=1)  # sampling steps per request
    max_n: int = Field(16, ge=1)  # images per request
    max_batch_images: int = Field(
        8, ge=1
    )  # forward rows per sampler call; guidance counts 2 per image
    min_guidance: float = 0.0  # classifier-free guidance range, inclusive
    max_guidance: float = 20.0
    max_body_bytes: int = Field(16_384, ge=256)  # larger bodies get 413
    max_prompt_chars: int = Field(256, ge=1)  # per prompt / negative prompt; longer: 422
    # one encoded init_image or mask (base64 counted as decoded bytes); larger ones get 413.
    # A 28x28 grey PNG is under 1 KiB; raise it with max_body_bytes for larger images.
    max_image_bytes: int = Field(16_384, ge=64)
    allowed_samplers: tuple[str, ...] = (
        "consistency",
        "ddim",
        "ddpm",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "euler",
        "euler_ancestral",
        "heun",
        "ipndm",
    )

    @field_validator("allowed_samplers")
    @classmethod
    def _known_samplers(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from difforge.samplers import SAMPLERS

        if not v:
            raise ValueError("allow at least one sampler")
        for name in v:
            check_choice("sampler", name, SAMPLERS)
        return v

    def request_limits(self, max_deadline_s: float = 600.0):
        """The part the request resolver checks (difforge.pipeline.RequestLimits)."""
        from difforge.pipeline import RequestLimits

        return RequestLimits(
            max_steps=self.max_steps,
            max_n=self.max_n,
            min_guidance=self.min_guidance,
            max_guidance=self.max_guidance,
            allowed_samplers=self.allowed_samplers,
            max_deadline_s=max_deadline_s,
            max_text_chars=self.max_prompt_chars,
            max_image_bytes=self.max_image_bytes,
        )

    @model_validator(mode="after")
    def _guidance_range(self) -> Limits:
        lo, hi = self.min_guidance, self.max_guidance
        if not (math.isfinite(lo) and math.isfinite(hi) and lo <= hi):
            raise ValueError(f"need finite min_guidance <= max_guidance, got {lo}, {hi}")
        return self


class RateLimit(_Frozen):
    """A token bucket per API key: `per_second` requests on average, bursts of `burst`."""

    per_second: float = Field(gt=0, allow_inf_nan=False)
    burst: int = Field(ge=1)


class ApiKey(_Frozen):
    """One API key: its id (safe to log), the sha256 hex of the key, and what it may do."""

    id: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    scopes: tuple[Scope, ...] = ("generate",)
    rate_limit: RateLimit | None = None  # overrides the service's default for this key


class RegistryFollow(_Frozen):
    """How a service started from a registry (`difforge serve --registry`) follows it, and when
    it rolls a canary back (see difforge.serving.registry_source)."""

    poll_s: float = Field(5.0, gt=0, allow_inf_nan=False)  # how often the revision is polled
    # PostgreSQL registry: also LISTEN for its change notifications and sync at once (polling
    # stays as the fallback; difforge.serving.registry_notify). No effect on SQLite.
    notify: bool = True
    # a version that failed to load (e.g. a tampered artifact) is retried after this, doubling
    # after each failure up to an hour; an admin route retries it at once
    retry_failed_s: float = Field(60.0, gt=0, allow_inf_nan=False)
    keep_previous: bool = True  # keep the replaced production warm: rollback without a reload
    auto_rollback: bool = True  # demote a canary that does worse than production
    check_s: float = Field(1.0, gt=0, allow_inf_nan=False)  # how often the canary is judged
    window_s: float = Field(60.0, gt=0, allow_inf_nan=False)  # judged on the last window_s
    margins: RollbackMargins = Field(default_factory=RollbackMargins)


class ResultCacheConfig(_Frozen):
    """The exact result cache (difforge.serving.cache): identical resolved requests answered
    from stored pixels, without a sampler call. Off by default."""

    max_bytes: int = Field(0, ge=0)  # pixel bytes kept, least recently used evicted; 0: off
    ttl_s: float | None = Field(None, gt=0, allow_inf_nan=False)  # None: until evicted
    per_tenant: bool = True  # entries are per API key id (False: shared by every caller)


class StateConfig(_Frozen):
    """Where Idempotency-Key records and rate-limit buckets live (difforge.serving.shared_state).

    "memory": in this process; right for one replica. "database": in two SQL tables that every
    replica on the same `url` shares (PostgreSQL across machines; SQLite for replicas on one
    machine): a retry that lands on another replica replays the stored response, and a key's
    rate limit holds across all of them. "auto" (the default): "database" when `url` is set or the
    service follows a PostgreSQL registry (`serve --registry postgresql+psycopg://...`, whose
    database is then used), else "memory".
    """

    backend: Literal["auto", "memory", "database"] = "auto"
    url: str | None = None  # SQLAlchemy URL; None: the registry's (serve --registry only)
    # an in-flight claim is renewed every claim_lease_s / 3 while its request runs; one not
    # renewed for claim_lease_s (its replica died) may be taken over by a retry elsewhere
    claim_lease_s: float = Field(10.0, gt=0, allow_inf_nan=False)
    # a larger response is answered but not stored (a retry computes it again)
    max_response_bytes: int = Field(4 << 20, ge=1)


class ServiceConfig(_Frozen):
    """Everything `difforge serve` needs besides the model.

    Batching: requests with the same model version, sampler, steps, grid, image shape, knobs and
    guided-ness are merged into one sampler call of at most `limits.max_batch_images` forward rows,
    waiting at most `batch_wait_ms` for company; a call padded to a fixed shape costs the same
    however few rows are real, so it waits longer, up to `pad_fill_wait` times the expected
    duration of the call (the engine's moving average of seconds per step x steps).
    `batch_invariance` decides how an image is kept independent of its batch (see
    difforge.serving.invariance): "pad" runs every call at one fixed shape (padding with throw-away
    rows), "chunk" runs what arrived with the network on exactly `chunk_rows` forward rows at a
    time (a lone request costs one chunk), "kernels" (the default) runs what arrived in one
    network call with batch-invariant kernels (difforge.nets.invariant), "per_sample" runs one
    image per call, "off" runs what arrived (responses then say batch_invariant: false). Every
    response names the mode it was computed in ("batching"), which says how to get the same bytes
    in-process.
    """

    limits: Limits = Field(default_factory=Limits)
    queue_size: int = Field(64, ge=1)  # requests waiting; one more gets 503 + Retry-After
    batch_wait_ms: float = Field(10.0, ge=0, le=10_000, allow_inf_nan=False)
    pad_fill_wait: float = Field(0.1, ge=0, le=1, allow_inf_nan=False)
    batch_invariance: InvarianceMode = "kernels"  # measured choice: serving/invariance.py
    chunk_rows: int = Field(2, ge=1, le=64)  # forward rows per network call, "chunk" only
    rate_limit: RateLimit | None = None  # default bucket for every key (None: unlimited)
    api_keys: tuple[ApiKey, ...] = ()  # none: only loopback clients are answered
    # Reverse proxies (IP addresses or CIDR networks) whose X-Forwarded-For is believed. None
    # (the default): the socket peer is the client, whatever the headers or uvicorn's
    # FORWARDED_ALLOW_IPS say (difforge runs uvicorn with proxy_headers off).
    trusted_proxies: tuple[str, ...] = ()
    audit_db: str = "difforge-audit.sqlite3"  # SQLite file; ":memory:" keeps it in the process
    default_deadline_s: float | None = Field(None, gt=0, allow_inf_nan=False)
    max_deadline_s: float = Field(600.0, gt=0, allow_inf_nan=False)
    idempotency_entries: int = Field(1024, ge=1)  # remembered Idempotency-Key responses
    idempotency_ttl_s: float = Field(3600.0, gt=0, allow_inf_nan=False)
    torch_threads: int | None = Field(
        None, ge=1
    )  # intra-op threads of the sampler thread (None: torch's default)
    warmup_steps: int = Field(2, ge=1)  # steps of the warm-up batch run before ready
    registry: RegistryFollow = Field(default_factory=RegistryFollow)  # serve --registry only
    result_cache: ResultCacheConfig = Field(default_factory=ResultCacheConfig)
    # output filters and the human review queue (difforge.serving.review); none: off
    filters: FiltersConfig = Field(default_factory=FiltersConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)  # difforge.serving.drift; off
    state: StateConfig = Field(default_factory=StateConfig)  # idempotency + rate limits
    # fallback under load: the circuit breaker and its cheap route (difforge.serving.fallback)
    breaker: BreakerConfig = Field(default_factory=BreakerConfig)

    @field_validator("api_keys")
    @classmethod
    def _unique_ids(cls, v: tuple[ApiKey, ...]) -> tuple[ApiKey, ...]:
        ids = [k.id for k in v]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"duplicate API key ids: {', '.join(dupes)}")
        return v

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for net in v:
            try:
                ipaddress.ip_network(net, strict=False)
            except ValueError:
                raise ValueError(f"{net!r} is not an IP address or CIDR network") from None
        return v

    @model_validator(mode="after")
    def _cheap_route_within_limits(self) -> ServiceConfig:
        # (degraded_steps needs no check: a request is only degraded to fewer steps than it has)
        b, lim = self.breaker, self.limits
        if b.degraded_sampler is not None and b.degraded_sampler not in lim.allowed_samplers:
            allowed = ", ".join(lim.allowed_samplers)
            raise ValueError(
                f"breaker.degraded_sampler must be one of limits.allowed_samplers ({allowed})"
            )
        return self

    @property
    def loopback_only(self) -> bool:
        """No keys configured: the service answers loopback clients only."""
        return not self.api_keys


def hash_key(key: str) -> str:
    """The sha256 hex digest stored in the config for API key `key`."""
    return hashlib.sha256(key.encode()).hexdigest()


def load_service_config(path: str | Path | None) -> ServiceConfig:
    """Read a ServiceConfig from JSON (None: all defaults).

    Raises:
        InvalidArgumentError: one line naming every bad field.
    """
    if path is None:
        return ServiceConfig()
    path = Path(path)
    try:
        return ServiceConfig.model_validate_json(path.read_text())
    except ValidationError as e:
        raise InvalidArgumentError(f"{path}: {error_line(e)}") from None
