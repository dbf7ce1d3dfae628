"""The drift monitor: a bounded rolling window of what each served version produced and was asked
for, compared with the version's evaluation reference on a schedule, exported as gauges.

    "drift": {"enabled": true, "window": 512, "interval_s": 30, "min_samples": 64,
              "reference": "report.json", "kid_max": 2000, "class_tv_max": 0.3}

What is kept, per version (bounded: `window` images, the oldest dropped first): each successful
image's uint8 pixels, its class (the null class for unconditional rows) or a text model's prompt
word ids, the request's steps and guidance: what the version produced, before the output filters
(difforge.serving.review) decide what the client gets, so a filter cannot hide a drifting model.
Observing is a deque append on the event loop; nothing is computed on the request path.

Every `interval_s`, a background task compares each version whose window has `min_samples` images
and changed since the last check:
  1. features of the window's new images, on the sampler thread (`Engine.call`: all torch work of
     the service stays on that one thread; see engine.on_passing_thread), in turn with batches:
     ~0.07 s for 512 28x28 images under the MNIST feature net on one core;
  2. FID, KID, the class-mix distance and the settings' means (difforge.evaluation.drift), on a
     worker thread (numpy / scipy only), so neither sampling nor the event loop waits for them.
The results become `difforge_drift_*{version}` gauges, with `difforge_drift_samples` beside them
and `difforge_drift_exceeded{version, metric}` = 1 where a configured threshold is crossed; GET
/v1/drift shows the same numbers with the reference they were measured against.

The reference (load_drift_reference), first that applies: `reference` = an evaluation report JSON
(the reference set it was scored against, its label mix and sampler settings) or a reference
statistics JSON; for a service that follows a registry (`serve --registry`), the served version's
latest attached evaluation report; else MNIST `reference_split`, what `difforge evaluate` compares
with by default. It is loaded on the
sampler thread when the monitor starts, queued behind warm-up (a few seconds when the reference
cache is cold, once per version).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from difforge.evaluation.drift import (
    DriftReference,
    load_drift_reference,
    prompt_token_probs,
    prompt_tokens,
    window_drift,
)

log = logging.getLogger("difforge.serving")

# gauge attribute of ServiceMetrics -> the window_drift key it shows
GAUGES = {
    "drift_fid": "fid",
    "drift_kid": "kid",
    "drift_class_tv": "class_tv",
    "drift_class_chi2_p": "class_chi2_p",
    "drift_prompt_tv": "prompt_tv",
    "drift_prompt_chi2_p": "prompt_chi2_p",
    "drift_steps_mean": "steps_mean",
    "drift_guidance_mean": "guidance_mean",
    "drift_samples": "samples",
}
THRESHOLDED = {
    "fid": "fid_max",
    "kid": "kid_max",
    "class_tv": "class_tv_max",
    "prompt_tv": "prompt_tv_max",
}


class DriftConfig(BaseModel):
    """The service config's "drift" section; off by default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = False
    window: int = Field(512, ge=2, le=20_000)  # images kept per version (oldest dropped)
    interval_s: float = Field(30.0, gt=0, allow_inf_nan=False)  # how often windows are compared
    min_samples: int = Field(64, ge=2)  # no comparison before a window holds this many images
    # an evaluation report JSON or a reference statistics JSON; None: MNIST reference_split
    reference: str | None = None
    reference_split: Literal["train", "test"] = "test"
    features: str | None = None  # feature network folder; None: the shipped models/mnist-features
    cache_dir: str | None = None  # reference statistics cache; None: ~/.cache/difforge
    # thresholds (None: not judged). FID depends on the window size (see evaluation.drift): set
    # fid_max for one window; KID does not. Measured values: benchmarks/RESULTS.md (drift rows).
    fid_max: float | None = Field(None, gt=0)
    kid_max: float | None = Field(None, gt=0)
    class_tv_max: float | None = Field(None, gt=0, le=1)
    prompt_tv_max: float | None = Field(None, gt=0, le=1)  # text models: prompt word mix


@dataclass(eq=False)
class _Entry:
    """One served image: uint8 pixels (C, H, W), its class (the null class for unconditional
    rows; None for a model without a class key), the request's steps and guidance, and its
    features once a check has computed them."""

    image: torch.Tensor
    label: int | None
    steps: int
    guidance: float
    tokens: list[int] | None = None  # a text model's prompt word ids (evaluation.prompt_tokens)
    features: np.ndarray | None = None  # (D,) float32


@dataclass
class _Window:
    """One version's most recent `size` images (oldest dropped first)."""

    size: int
    entries: deque = field(init=False)
    added: int = 0  # images ever observed (a check runs only when this moved)
    checked_at: int = 0

    def __post_init__(self) -> None:
        self.entries = deque(maxlen=self.size)

    def add(self, entry: _Entry) -> None:
        self.entries.append(entry)
        self.added += 1


class DriftMonitor:
    """Windows per version, the scheduled comparison and its gauges.

    Args:
        config: the "drift" section.
        metrics: the service's metrics (ServiceMetrics: the drift gauges live there).
        served: returns the ModelVersions now served (windows of others are dropped).
        extractor: the feature network; default: loaded from `config.features` at the first check.
    """

    def __init__(self, config: DriftConfig, metrics, served: Callable[[], list], extractor=None):
        self.config, self.metrics, self.served = config, metrics, served
        self.extractor = extractor
        # version -> its evaluation report (dict) or None; set by a service that follows a
        # registry (serving.registry_source), read when config.reference is not given
        self.report_for: Callable[[Any], dict | None] | None = None
        self.windows: dict[str, _Window] = {}
        self.references: dict[str, DriftReference] = {}
        self.results: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, str] = {}
        self._task: asyncio.Task | None = None
        self._keys_of: dict[str, tuple] = {}
        for metric in THRESHOLDED:
            limit = getattr(config, THRESHOLDED[metric])
            if limit is not None:
                metrics.drift_threshold.labels(metric).set(limit)

    # -- the request path: appends only ----------------------------------------------------------

    def observe(self, job, ok: bool, latency_s: float) -> None:
        """A Service outcome observer: keep a successful job's images and settings."""
        if not ok:
            return
        version = job.version
        window = self.windows.get(version.id)
        if window is None:
            window = self.windows[version.id] = _Window(self.config.window)
        (cls, text) = self._keys(version)
        for row, image in zip(job.rows, job.images, strict=True):
            if image is None:
                continue
            label = tokens = None
            if cls is not None:
                value = row.cond.get(cls[0])
                label = cls[1] if value is None else int(value)
            if text is not None:
                value = row.cond.get(text[0])
                ids = [] if value is None else value.tolist()
                tokens = prompt_tokens(ids, text[1])
            window.add(_Entry(image, label, job.key.steps, float(row.guidance), tokens))

    def _keys(self, version) -> tuple[tuple[str, int] | None, tuple[str, int] | None]:
        """(class key name, its null class) and (text key name, its vocabulary size), or None."""
        if version.id not in self._keys_of:
            spec = version.model.spec
            k = spec.class_key()
            t = next((key for key in spec.keys if key.kind == "text"), None)
            vocab = None
            if t is not None:
                from difforge.data.tokenizer import tokenizer_from_json

                vocab = (t.name, tokenizer_from_json(t.tokenizer).vocab_size)
            self._keys_of[version.id] = (None if k is None else (k.name, k.null), vocab)
        return self._keys_of[version.id]

    # -- the schedule ----------------------------------------------------------------------------

    def start(self, engine) -> None:
        """Start the periodic comparison (a task on the running loop)."""
        self._task = asyncio.create_task(self._loop(engine), name="difforge-drift")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self, engine) -> None:
        await self.prepare(engine)
        while True:
            await asyncio.sleep(self.config.interval_s)
            await self.check(engine)

    async def prepare(self, engine) -> None:
        """Load the reference of every served version now (queued behind warm-up on the sampler
        thread), so that a cold reference cache does not stall the first check."""
        for version in self.served():
            if version.id in self.references:
                continue
            try:
                self.references[version.id] = await engine.call(self._reference, version)
            except Exception as e:  # reported by the status route; retried at the first check
                self.errors[version.id] = f"{type(e).__name__}: {e}"
                self.metrics.drift_check_errors.inc()
                log.exception("drift reference of version %s failed", version.id)

    async def check(self, engine) -> dict[str, dict[str, Any]]:
        """Compare every window that is full enough and changed; returns version -> result."""
        served = {v.id: v for v in self.served()}
        for gone in set(self.windows) - set(served):
            self._forget(gone)
        done = {}
        for vid, window in list(self.windows.items()):
            if len(window.entries) < self.config.min_samples or window.added == window.checked_at:
                continue
            try:
                done[vid] = await self._check_one(engine, served[vid], window)
            except Exception as e:  # a broken reference must not stop the monitor or the service
                window.checked_at = window.added  # retried when new images arrive, not before
                self.errors[vid] = f"{type(e).__name__}: {e}"
                self.metrics.drift_check_errors.inc()
                log.exception("drift check of version %s failed", vid)
        return done

    async def _check_one(self, engine, version, window: _Window) -> dict[str, Any]:
        t0 = time.perf_counter()
        added = window.added
        if version.id not in self.references:
            self.references[version.id] = await engine.call(self._reference, version)
        reference = self.references[version.id]
        entries = list(window.entries)  # a snapshot: requests keep arriving while we wait
        todo = [e for e in entries if e.features is None]
        if todo:  # features of the new images only, on the sampler thread
            feats = await engine.call(self._features, torch.stack([e.image for e in todo]))
            for e, f in zip(todo, feats, strict=True):
                e.features = f
        features = np.stack([e.features for e in entries])  # (n, D)
        labels = [e.label for e in entries]
        labels = None if any(x is None for x in labels) else labels
        tokens = None
        if all(e.tokens is not None for e in entries):
            tokens = [t for e in entries for t in e.tokens]  # the window's prompt words, flat
        steps, guidance = [e.steps for e in entries], [e.guidance for e in entries]
        result = await asyncio.to_thread(
            window_drift,
            features,
            reference,
            labels=labels,
            tokens=tokens,
            steps=steps,
            guidance=guidance,
        )
        result["seconds"] = round(time.perf_counter() - t0, 4)
        result["checked_at"] = time.time()
        window.checked_at = added
        self.results[version.id] = result
        self.errors.pop(version.id, None)
        self._publish(version.id, result)
        return result

    def _reference(self, version) -> DriftReference:
        if self.extractor is None:
            from difforge.evaluation.features import load_feature_extractor

            self.extractor = load_feature_extractor(self.config.features)
        from difforge.evaluation.against import check_trained_on_mnist

        m = version.model
        self.extractor.features(torch.zeros(2, *m.image_shape))  # one that cannot read it: raise
        report = None
        if self.config.reference is None and self.report_for is not None:
            report = self.report_for(version)
        if self.config.reference is None and report is None:
            check_trained_on_mnist(m)  # the default reference is MNIST's
        text = next((key for key in m.spec.keys if key.kind == "text"), None)
        ref = load_drift_reference(
            self.config.reference,
            self.extractor,
            num_classes=m.num_classes,
            default_steps=m.sampling.steps,
            default_guidance=m.sampling.guidance,
            default_split=self.config.reference_split,
            report=report,
            cache_dir=self.config.cache_dir,
        )
        return ref if text is None else replace(ref, token_probs=prompt_token_probs(text))

    def _features(self, images: torch.Tensor) -> np.ndarray:
        from difforge.evaluation.features import extract

        return extract(self.extractor.features, images).astype(np.float32)  # (n, D)

    # -- export ----------------------------------------------------------------------------------

    def exceeded(self, result: dict[str, Any]) -> dict[str, bool]:
        """metric -> whether its configured threshold is crossed (configured metrics only)."""
        out = {}
        for metric, limit_name in THRESHOLDED.items():
            limit = getattr(self.config, limit_name)
            if limit is not None:
                value = result.get(metric)
                out[metric] = value is not None and value > limit
        return out

    def _publish(self, vid: str, result: dict[str, Any]) -> None:
        m = self.metrics
        for attr, key in GAUGES.items():
            value = result.get(key)
            getattr(m, attr).labels(vid).set(float("nan") if value is None else value)
        for metric, over in self.exceeded(result).items():
            m.drift_exceeded.labels(vid, metric).set(int(over))
        m.drift_last_check_timestamp_seconds.labels(vid).set(result["checked_at"])
        m.drift_checks.inc()

    def _forget(self, vid: str) -> None:
        self.windows.pop(vid, None)
        self.references.pop(vid, None)
        self.results.pop(vid, None)
        self._keys_of.pop(vid, None)
        for attr in (*GAUGES, "drift_last_check_timestamp_seconds"):
            with contextlib.suppress(KeyError):
                getattr(self.metrics, attr).remove(vid)
        for metric in THRESHOLDED:
            with contextlib.suppress(KeyError):
                self.metrics.drift_exceeded.remove(vid, metric)

    def status(self) -> dict[str, Any]:
        """GET /v1/drift: the settings, and per served version its window and latest result."""
        cfg = self.config
        versions = {}
        for vid, window in self.windows.items():
            result = self.results.get(vid)
            ref = self.references.get(vid)
            versions[vid] = {
                "window_images": len(window.entries),
                "observed_images": window.added,
                "result": result,
                "exceeded": None if result is None else self.exceeded(result),
                "reference": None if ref is None else ref.describe(),
                "error": self.errors.get(vid),
            }
        settings = cfg.model_dump(exclude={"enabled"})
        return {"enabled": True, "settings": settings, "versions": versions}


def fetch_status(url: str, key: str | None = None) -> dict[str, Any]:
    """GET /v1/drift of a running service (`difforge drift status`), with an admin key or from
    loopback; errors are the service's detail (ReviewClientError), one line."""
    from difforge.serving.review_client import ReviewClient

    client = ReviewClient(url, key)  # the admin client of the review CLI: same auth and errors
    try:
        return client._call("GET", "/v1/drift").json()
    finally:
        client.close()


def status_lines(status: dict[str, Any]) -> list[str]:
    """One line per served version: window, latest distances and what is over its threshold."""
    lines = []
    for vid, v in status["versions"].items():
        head = f"{vid}: {v['window_images']} images in the window"
        r = v["result"]
        if r is None:
            lines.append(f"{head}; {v['error'] or 'no check yet'}")
            continue
        shown = [
            f"{k} {r[k]:.4g}" for k in ("fid", "kid", "class_tv", "prompt_tv") if r[k] is not None
        ]
        over = [m for m, hit in (v["exceeded"] or {}).items() if hit]
        tail = f"; over: {', '.join(over)}" if over else ""
        lines.append(f"{head}; checked on {r['samples']}: {', '.join(shown)}{tail}")
    return lines or ["no version has served an image yet"]
