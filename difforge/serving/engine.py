"""The batching engine: a bounded queue, a batcher that merges compatible requests, and one worker
thread that runs the sampler calls (batch -> predict -> unbatch of the serving contract).

* Bounded: `submit` refuses a request when `queue_size` requests wait (QueueFull: queue_full); the
  queue never grows past it.
* Batching: the oldest waiting request (the head) fixes the BatchKey; later requests with the same
  key join it, oldest first, until the call holds `plan.micro(guided)` images or the head has waited
  long enough since it was accepted: `batch_wait_ms`, or for a padded call (fixed shape, so an
  empty row costs as much as a real one) up to `pad_fill_wait` x the call's expected duration.
  Measured (16 closed-loop clients, 16 images per padded call, 20 s, models/mnist-cond): 4.0
  img/s with the 10 ms wait alone, 8.0 img/s with pad_fill_wait 0.1.
  A request larger than one call is split across calls.
* Off the event loop: sampler calls run on one dedicated thread, so health checks, metrics and
  new requests are answered while a batch runs. One thread, because the CPU's cores already go to
  torch's intra-op threads; two concurrent calls would only contend.
* One torch thread: every torch computation of the serving process runs on that sampler thread
  (model loads included, through `Engine.call`) or on a passing thread that exits when done
  (`on_passing_thread`, for loads before the engine starts). See `on_passing_thread` for why.
* Cancellation (deadline passed, client gone): a request is dropped before compute if it is still
  queued. Once its call runs, the sampler callback checks after every step: when every request in
  the call is cancelled the call stops (SamplingCancelled); otherwise the call finishes for the
  others and the cancelled request's images are dropped. Splitting the call instead would save
  nothing with "pad" (a removed row becomes a padding row) and little with "chunk".
* Shapes: "pad" runs every call at its full padded shape, "chunk" runs what the call holds in
  fixed chunks of forward rows, so a lone request costs one chunk (difforge.serving.invariance).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from difforge.core.errors import DifforgeError, SamplingCancelled
from difforge.samplers import StepInfo, expected_nfe
from difforge.serving.batching import BatchKey, Row, sample_rows
from difforge.serving.config import ServiceConfig
from difforge.serving.metrics import ServiceMetrics
from difforge.serving.router import ModelVersion

log = logging.getLogger("difforge.serving")


def on_passing_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on a new thread that exits when it returns; its result (or its exception).

    Why: with torch's OpenMP backend (libgomp), each thread that runs a parallel torch op gets its
    own OpenMP team, which lives as long as the thread. Once the process holds more OpenMP threads
    than cores, libgomp stops spinning between parallel regions for good, and every later op pays
    a futex wake-up. Measured on the 2-core dev machine (2 torch threads, models/mnist-cond, guided
    dpmpp_2m, 10 steps, on the sampler thread): model loaded on the main thread, 1 image 0.47-0.85 s
    and 4 images 0.90-1.03 s per call; loaded on a passing thread, 0.19-0.26 s and 0.54-0.62 s.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=target, name="difforge-passing")
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


class QueueFull(DifforgeError):
    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        super().__init__(f"the queue is full; retry in {retry_after:.1f} s")


class JobFailed(DifforgeError):
    """The sampler call of a request raised (an internal error, not the client's)."""


class NonFiniteOutput(JobFailed):
    """The model produced NaN or inf for an image: a broken version, never an image to send
    (uint8 conversion would turn it into plausible-looking black pixels)."""


def finite_rows(x: Tensor) -> list[bool]:
    """Whether each sample of a batch (B, ...) is finite everywhere."""
    return torch.isfinite(x).flatten(1).all(1).tolist()


@dataclass(eq=False)
class Job:
    """One accepted request inside the engine."""

    request_id: str
    version: ModelVersion
    role: str
    key: BatchKey
    rows: list[Row]
    key_id: str | None = None  # the API key id that asked (for progress queries)
    deadline: float | None = None  # time.monotonic() after which the request is cancelled
    accepted: float = field(default_factory=time.monotonic)
    started: float | None = None  # first sampler call began
    handed: int = 0  # rows given to sampler calls so far
    images: list[Tensor | None] = field(default_factory=list)  # uint8 (C, H, W) per row
    call_images: list[int] = field(default_factory=list)  # real images in each of its calls
    step: int = 0  # steps done in its current call
    progress: float = 0.0  # fraction of its images' steps done
    nfe: int = 0
    cpu_seconds: float = 0.0
    cancel_reason: str | None = None  # "deadline" or "disconnect"; set from any thread
    failure: JobFailed | None = None  # set when one of its images came out non-finite
    degraded: Any = None  # the cheap route's Degradation (serving.fallback), if it took it
    future: asyncio.Future | None = None

    def __post_init__(self) -> None:
        self.images = [None] * len(self.rows)

    def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now >= self.deadline

    @property
    def done(self) -> int:
        return sum(img is not None for img in self.images)

    @property
    def status(self) -> str:
        return "queued" if self.started is None else "running"


@dataclass
class _Call:
    """One sampler call being assembled: (job, row index) slots."""

    key: BatchKey
    version: ModelVersion
    slots: list[tuple[Job, int]]

    @property
    def jobs(self) -> list[Job]:
        return list(dict.fromkeys(job for job, _ in self.slots))


class Engine:
    """Queue + batcher + worker thread. `start()` inside the event loop that will `submit`."""

    def __init__(self, config: ServiceConfig, metrics: ServiceMetrics):
        self.config = config
        self.metrics = metrics
        self.jobs: dict[str, Job] = {}  # accepted, not yet answered (for progress queries)
        self._pending: deque[Job] = deque()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="difforge-sampler")
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._call_seconds = 1.0  # moving average, for Retry-After estimates
        self._step_seconds: dict[tuple[str, bool], float] = {}  # (version, guided): moving average

    async def start(self) -> None:
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._loop(), name="difforge-batcher")

    def cancel_all(self, reason: str) -> None:
        """Cancel every accepted request (running calls stop at their next step)."""
        for job in list(self.jobs.values()):
            job.cancel(reason)

    async def stop(self) -> None:
        self.cancel_all("shutdown")
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for job in list(self.jobs.values()):
            self._finish(job, None)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown, True)

    async def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run `fn(*args)` on the sampler thread (warm-ups, probes), in turn with batches."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def retry_after_s(self) -> float:
        """A guess at when a request now queued will be done: for Retry-After."""
        return min(60.0, max(1.0, self._call_seconds * (1 + len(self._pending))))

    @property
    def depth(self) -> int:
        return len(self._pending)

    def submit(self, job: Job) -> asyncio.Future:
        """Queue `job`; its future resolves to the job when every image is done.

        Raises:
            QueueFull: `queue_size` requests are already waiting.
        """
        if len(self._pending) >= self.config.queue_size:
            wait = self._call_seconds * (1 + len(self._pending) / max(1, self._micro(job)))
            raise QueueFull(min(60.0, max(1.0, wait)))
        job.future = asyncio.get_running_loop().create_future()
        self._pending.append(job)
        self.jobs[job.request_id] = job
        self._gauges()
        self.wake()
        return job.future

    def wake(self) -> None:
        """Re-examine the queue (after a submit or a cancellation)."""
        if self._wake is not None:
            self._wake.set()

    # -- batcher (event loop) --------------------------------------------------------------------

    @staticmethod
    def _micro(job: Job) -> int:
        plan = job.version.plan
        return 1 if plan is None else plan.micro(job.key.guided)

    async def _loop(self) -> None:
        while True:
            call = await self._next_call()
            try:
                await self._run(call)
            except Exception:  # never let one bad call stop the batcher
                log.exception("sampler call failed")
                for job in call.jobs:
                    self._finish(job, JobFailed("internal error while sampling"))

    async def _next_call(self) -> _Call:
        assert self._wake is not None
        while True:
            self._drop_dead()
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            head = self._pending[0]
            cap = self._micro(head)
            ready_at = head.accepted + self._wait_s(head)
            now = time.monotonic()
            if self._available(head.key) >= cap or now >= ready_at:
                return self._take(head, cap)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), ready_at - now)

    def _wait_s(self, head: Job) -> float:
        """How long the head may wait for company (see the module docstring)."""
        wait = self.config.batch_wait_ms / 1000
        plan = head.version.plan
        per_step = self._step_seconds.get((head.version.id, head.key.guided))
        if plan is None or not plan.pad or per_step is None:
            return wait
        return max(wait, self.config.pad_fill_wait * per_step * head.key.steps)

    def _available(self, key: BatchKey) -> int:
        return sum(len(j.rows) - j.handed for j in self._pending if j.key == key)

    def _take(self, head: Job, cap: int) -> _Call:
        slots: list[tuple[Job, int]] = []
        for job in list(self._pending):
            if job.key != head.key:
                continue
            take = min(cap - len(slots), len(job.rows) - job.handed)
            slots += [(job, job.handed + i) for i in range(take)]
            job.handed += take
            if job.handed == len(job.rows):
                self._pending.remove(job)
            if len(slots) == cap:
                break
        self._gauges()
        return _Call(head.key, head.version, slots)

    def _drop_dead(self) -> None:
        now = time.monotonic()
        for job in [j for j in self._pending if j.cancel_reason or j.expired(now)]:
            job.cancel("deadline")
            self._pending.remove(job)
            self._finish(job, None)

    async def _run(self, call: _Call) -> None:
        now = time.monotonic()
        for job in call.jobs:
            if job.started is None:
                job.started = now
                self.metrics.queue_wait_seconds.observe(now - job.accepted)
        plan = call.version.plan
        pad_to = plan.micro(call.key.guided) if plan is not None and plan.pad else None
        chunk = plan.chunk_rows if plan is not None else None
        rows = [job.rows[i] for job, i in call.slots]
        t0 = time.perf_counter()
        images, nfe, cpu = await self.call(self._compute, call, rows, pad_to, chunk)
        seconds = time.perf_counter() - t0
        self._call_seconds = 0.8 * self._call_seconds + 0.2 * seconds
        if images is not None:  # a completed call: its time per step predicts the next one's
            k = (call.version.id, call.key.guided)
            per_step = seconds / call.key.steps
            self._step_seconds[k] = 0.8 * self._step_seconds.get(k, per_step) + 0.2 * per_step
        self._account(call, images, nfe, cpu, pad_to)
        for job in call.jobs:
            if job.cancel_reason is not None:
                self._finish(job, None)
            elif job.failure is not None:
                self._finish(job, job.failure)
            elif job.done == len(job.rows):
                self._finish(job, job)

    def _account(self, call: _Call, images, nfe: int, cpu: float, pad_to: int | None) -> None:
        version = call.version.id
        n = len(call.slots)
        self.metrics.batch_images.labels(version).observe(n)
        self.metrics.nfe.labels(version).inc(nfe)
        if pad_to is not None and pad_to > n:
            self.metrics.padding_images.labels(version).inc(pad_to - n)
        for _ in range(n):
            self.metrics.image_cpu_seconds.labels(version).observe(cpu / n)
        for job in call.jobs:
            mine = [i for j, i in call.slots if j is job]
            job.call_images.append(n)
            job.nfe += nfe
            job.cpu_seconds += cpu * len(mine) / n
        if images is None:
            return
        for (job, i), (img, finite) in zip(call.slots, images, strict=True):
            if finite:
                job.images[i] = img
            elif job.failure is None:
                log.error("model version %s produced non-finite output (%s)", version, job.key)
                job.failure = NonFiniteOutput(
                    f"model version {version} produced non-finite values (NaN or inf)"
                )

    def _finish(self, job: Job, result: Job | BaseException | None) -> None:
        """Answer a job: result = the job (success), an exception (failure), None (cancelled)."""
        self.jobs.pop(job.request_id, None)
        with contextlib.suppress(ValueError):
            self._pending.remove(job)
        fut = job.future
        if fut is not None and not fut.done():
            if result is None:
                fut.cancel()
            elif isinstance(result, BaseException):
                fut.set_exception(result)
            else:
                fut.set_result(result)
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(len(self._pending))
        self.metrics.inflight.set(len(self.jobs))

    # -- the sampler thread ----------------------------------------------------------------------

    def _compute(self, call: _Call, rows: list[Row], pad_to: int | None, chunk: int | None):
        """Runs on the sampler thread: ((uint8 image, finite) per row, or None if stopped; NFE;
        CPU seconds)."""
        jobs = call.jobs
        steps = call.key.steps
        per_job = {job: sum(1 for j, _ in call.slots if j is job) for job in jobs}
        step_hist = self.metrics.step_seconds.labels(call.version.id, call.key.sampler)
        last = [time.perf_counter()]

        def on_step(info: StepInfo) -> None:
            t = time.perf_counter()
            step_hist.observe(t - last[0])
            last[0] = t
            now = time.monotonic()
            for job in jobs:
                job.step = info.i + 1
                job.progress = (job.done + per_job[job] * job.step / steps) / len(job.rows)
                if job.expired(now):
                    job.cancel("deadline")
            if all(job.cancel_reason is not None for job in jobs):
                raise SamplingCancelled("every request in this call was cancelled")

        cpu0 = time.process_time()
        try:
            x, nfe = sample_rows(
                call.version.model,
                call.key,
                rows,
                pad_to=pad_to,
                chunk_rows=chunk,
                callback=on_step,
            )
        except SamplingCancelled:
            done = max((job.step for job in jobs), default=0)
            nfe = expected_nfe(call.key.sampler, done) if done else 0  # forwards actually run
            return None, nfe, time.process_time() - cpu0
        # finite is judged before decoding: uint8 pixels would hide a NaN as black
        images = list(zip(call.version.model.decode(x), finite_rows(x), strict=True))
        return images, nfe, time.process_time() - cpu0
