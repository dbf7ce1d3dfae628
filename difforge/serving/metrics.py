"""Prometheus metrics of one service, in a registry of its own (two apps in one process never
share counters). Names follow Prometheus conventions: base units in the name, `_total` counters.

Labels are bounded: routes are path templates, versions are 12-hex prefixes of the weights'
sha256, reasons come from a fixed set. No API key and no key id is ever a label.

Cost per image is a query:
    rate(difforge_image_cpu_seconds_sum[5m]) / rate(difforge_image_cpu_seconds_count[5m])
(process CPU seconds of each sampler call, split evenly over its real images; padding rows are
part of the cost they impose.)
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ERROR_REASONS = (
    "validation",
    "body_too_large",
    "unsupported_media_type",
    "unauthorized",
    "forbidden",
    "rate_limited",
    "queue_full",
    "not_ready",
    "shutdown",
    "deadline",
    "disconnect",
    "idempotency_conflict",
    "idempotency_mismatch",
    "not_found",
    "internal",
    "non_finite",
    "gate_failed",
    "integrity_failure",
    "registry_conflict",
    "registry_unavailable",
    "output_refused",
    "review_full",
    "review_conflict",
    "review_rejected",
    "review_expired",
)
# failures that count against the version that served the request (not the client's doing)
VERSION_FAILURES = ("internal", "non_finite", "deadline")
ROLES = ("production", "canary", "fast")  # the router's roles, exported from the start
FILTER_DECISIONS = ("pass", "review", "refuse")
REVIEW_OUTCOMES = ("held", "approved", "rejected", "expired", "full")
REGISTRY_EVENTS = ("install", "load_failed", "auto_rollback", "poll_error")
CACHE_EVICTIONS = ("bytes", "ttl")  # why a result cache entry was dropped

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_STEP = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128)


# attribute: (kind, exported name, help, labels, histogram buckets)
_METRICS: dict[str, tuple[type, str, str, tuple[str, ...], tuple[float, ...] | None]] = {
    "request_seconds": (
        Histogram,
        "difforge_http_request_duration_seconds",
        "HTTP request latency by route template, method and status code.",
        ("route", "method", "status"),
        _LATENCY,
    ),
    "queue_wait_seconds": (
        Histogram,
        "difforge_queue_wait_seconds",
        "Time from acceptance to the start of the request's first sampler call.",
        (),
        _LATENCY,
    ),
    "batch_images": (
        Histogram,
        "difforge_batch_size_images",
        "Real images (requests' images, padding excluded) per sampler call.",
        ("version",),
        _BATCH,
    ),
    "padding_images": (
        Counter,
        "difforge_batch_padding_images_total",
        "Padding rows computed to keep sampler calls at a fixed, batch-invariant shape.",
        ("version",),
        None,
    ),
    "step_seconds": (
        Histogram,
        "difforge_denoising_step_seconds",
        "Wall time of one denoising step of a sampler call.",
        ("version", "sampler"),
        _STEP,
    ),
    "nfe": (
        Counter,
        "difforge_nfe_total",
        "Network function evaluations (batched forwards).",
        ("version",),
        None,
    ),
    "images": (
        Counter,
        "difforge_images_total",
        "Images returned to clients.",
        ("version", "sampler"),
        None,
    ),
    "errors": (
        Counter,
        "difforge_errors_total",
        "Requests that ended in an error, by reason and the role of the version they were routed "
        "to (none: refused before routing).",
        ("reason", "role"),
        None,
    ),
    "routed": (
        Counter,
        "difforge_generate_requests_total",
        "Generation requests routed to a model version, by its role (the error rate's denominator).",
        ("role",),
        None,
    ),
    "breaker_state": (
        Gauge,
        "difforge_breaker_state",
        "The circuit breaker's state: 1 for the current one of closed, open, half_open.",
        ("state",),
        None,
    ),
    "breaker_transitions": (
        Counter,
        "difforge_breaker_transitions_total",
        "Circuit breaker transitions, by the state entered.",
        ("state",),
        None,
    ),
    "degraded": (
        Counter,
        "difforge_degraded_requests_total",
        "Requests answered by the cheaper route while the breaker was open, by why it opened "
        "(latency or queue_wait SLO).",
        ("reason",),
        None,
    ),
    "queue_depth": (
        Gauge,
        "difforge_queue_depth_requests",
        "Requests waiting for a sampler call.",
        (),
        None,
    ),
    "inflight": (
        Gauge,
        "difforge_inflight_requests",
        "Requests accepted and not yet answered.",
        (),
        None,
    ),
    "model_info": (
        Gauge,
        "difforge_model_info",
        "Served model versions (value 1) with their name, version id and role.",
        ("name", "version", "role"),
        None,
    ),
    "image_cpu_seconds": (
        Histogram,
        "difforge_image_cpu_seconds",
        "Process CPU seconds of a sampler call attributed to each of its real images.",
        ("version",),
        (*_STEP, 10, 30),
    ),
    "registry_events": (
        Counter,
        "difforge_registry_events_total",
        "Changes and failures while following a registry (serve --registry), by event.",
        ("event",),
        None,
    ),
    "registry_version": (
        Gauge,
        "difforge_registry_version",
        "The registry version number each served role runs (serve --registry).",
        ("name", "role", "version"),
        None,
    ),
    "cache_hits": (
        Counter,
        "difforge_result_cache_hits_total",
        "Requests answered from the exact result cache (no sampler call).",
        (),
        None,
    ),
    "cache_misses": (
        Counter,
        "difforge_result_cache_misses_total",
        "Cacheable requests (seeds given, cache on) not found in the result cache.",
        (),
        None,
    ),
    "cache_evictions": (
        Counter,
        "difforge_result_cache_evictions_total",
        "Result cache entries dropped, by reason (bytes: over max_bytes, ttl: expired).",
        ("reason",),
        None,
    ),
    "filter_decisions": (
        Counter,
        "difforge_filter_decisions_total",
        "Output filter decisions, one per filter and image, by filter, decision and version.",
        ("filter", "decision", "version"),
        None,
    ),
    "filter_pass_ratio": (
        Gauge,
        "difforge_filter_pass_ratio",
        "Fraction of a version's filtered images that passed every filter, since start.",
        ("version",),
        None,
    ),
    "review_outcomes": (
        Counter,
        "difforge_review_outcomes_total",
        "Outputs held for review, approved, rejected, expired, or refused for want of room.",
        ("outcome",),
        None,
    ),
    "review_held": (
        Gauge,
        "difforge_review_held_outputs",
        "Outputs in the review queue (pending or approved, not yet expired).",
        (),
        None,
    ),
    "review_bytes": (
        Gauge,
        "difforge_review_held_bytes",
        "Encoded bytes of the outputs in the review queue.",
        (),
        None,
    ),
    "cache_bytes": (
        Gauge,
        "difforge_result_cache_bytes",
        "Pixel bytes held by the result cache.",
        (),
        None,
    ),
    # the drift monitor (difforge.serving.drift): one series per served version once checked
    **{
        f"drift_{key}": (Gauge, f"difforge_drift_{key}", doc, ("version",), None)
        for key, doc in {
            "fid": "FID of the version's recent images against its evaluation reference "
            "(NaN while the window holds no more images than feature dimensions).",
            "kid": "KID (unbiased MMD^2) of the version's recent images against its reference.",
            "class_tv": "Total variation between the window's requested class mix and the "
            "reference's (0: same mix, 1: disjoint).",
            "class_chi2_p": "Chi-square p-value of the window's class counts under the "
            "reference's class mix.",
            "prompt_tv": "Text models: total variation between the window's prompt word mix and "
            "that of the model's example prompts.",
            "prompt_chi2_p": "Text models: chi-square p-value of the window's prompt word counts.",
            "steps_mean": "Mean requested sampling steps over the window's images.",
            "guidance_mean": "Mean requested guidance scale over the window's images.",
            "samples": "Images in the window the drift numbers were computed on.",
            "last_check_timestamp_seconds": "Unix time of the version's last drift check.",
        }.items()
    },
    "drift_exceeded": (
        Gauge,
        "difforge_drift_exceeded",
        "1 when the version's drift metric is over its configured threshold, else 0.",
        ("version", "metric"),
        None,
    ),
    "drift_threshold": (
        Gauge,
        "difforge_drift_threshold",
        "The configured drift threshold of each judged metric.",
        ("metric",),
        None,
    ),
    "drift_checks": (
        Counter,
        "difforge_drift_checks_total",
        "Drift comparisons of a version's window with its reference.",
        (),
        None,
    ),
    "drift_check_errors": (
        Counter,
        "difforge_drift_check_errors_total",
        "Drift comparisons that failed (e.g. the reference could not be loaded).",
        (),
        None,
    ),
}


class ServiceMetrics:
    """Every metric the service exports (one attribute per `_METRICS` entry); `exposition()` is
    the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        # called before each exposition: state that changes with time alone (the breaker's)
        self.refreshers: list[Callable[[], None]] = []
        for attr, (kind, name, doc, labels, buckets) in _METRICS.items():
            extra = {} if buckets is None else {"buckets": buckets}
            setattr(self, attr, kind(name, doc, list(labels), registry=r, **extra))
        for reason in ERROR_REASONS:
            self.errors.labels(reason, "none")  # exported as 0 from the start
        for role in ROLES:
            self.routed.labels(role)
            for reason in VERSION_FAILURES:  # what the canary error-rate alert compares
                self.errors.labels(reason, role)
        for reason in CACHE_EVICTIONS:
            self.cache_evictions.labels(reason)
        for outcome in REVIEW_OUTCOMES:
            self.review_outcomes.labels(outcome)

    def set_models(self, versions: list[tuple[str, str, str]]) -> None:
        """(name, version, role) of every served version; replaces the previous set."""
        self.model_info.clear()
        for name, version, role in versions:
            self.model_info.labels(name, version, role).set(1)

    def set_registry_versions(self, name: str, served: list[tuple[str, str, int]]) -> None:
        """(role, version id, registry version) of every served version of registry model `name`."""
        self.registry_version.clear()
        for role, version, number in served:
            self.registry_version.labels(name, role, version).set(number)

    def error(self, reason: str, role: str | None = None) -> None:
        """Count a failed request; `role`: the role of the version it was routed to, if it was."""
        self.errors.labels(reason, role or "none").inc()

    def exposition(self) -> bytes:
        for refresh in self.refreshers:
            refresh()
        return generate_latest(self.registry)
