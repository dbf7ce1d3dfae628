"""Is an image independent of the batch it was computed in? Measured, not assumed.

Batched matrix kernels are not always batch-invariant in floating point (diffusers #2659): oneDNN
and MKL pick blockings and thread splits by shape, so one sample's network output can change in
its last bits with the batch size, and sometimes with its position in the batch. Over a sampling
trajectory those bits grow into different uint8 pixels.

Measured on this project's 2-core AMD EPYC (torch 2.13, random-weight difforge U-Nets;
`python -m benchmarks.serve_load --only-invariance --net {tiny,small,mnist}`):
  * one forward at any batch size > 1 differs from the same image at batch size 1 (max |diff|
    1e-6 tiny net, 1e-5 MNIST-size net); over 8-10 guided dpmpp_2m steps that grows to 0.04-0.3
    in data space (one uint8 level is 0.0078), and for the MNIST-size net a uint8 pixel changed
    even though these random nets' outputs are mostly clamped;
  * at a FIXED batch size the output does not depend on the neighbours, and with 1 thread not on
    the position either; with 2 threads it does for some sizes (5, 6, 7: rows >= 4, the second
    thread's share, differ) and not for others (2, 3, 4, 8, 16).

So the engine runs every sampler call at one fixed shape (`BatchPlan` mode "pad") and, before a
model version serves, `probe` checks that shape end to end: a probe image computed at each
position among different neighbours must come out bitwise identical. If it does not, the version
falls back to one image per call ("per_sample", always invariant, no batching gain). The cost of
"pad" is the padding rows: a lone request computes a full call.

Mode "chunk" fixes the shape of each network call instead of the sampler call's: a call of any
size runs the network on exactly `chunk_rows` forward rows at a time (difforge.core.chunked), so
a lone guided image with chunk_rows 2 costs one 2-row forward, what sampling it alone in-process
costs. Measured on models/mnist-cond (one denoiser forward, rows bitwise equal across shapes;
1 thread): {1}, {2, 3}, {4, 6, 8, 12}, {5}, {16, 24, 32, 48} are the classes of equal per-row
output; with 2 threads {4, 8, ..., 48} is one class. No small shape equals the large ones, so a
chunk size is a latency/throughput trade (benchmarks/serve_ab.py, 1 thread, guided, 10 steps, a
machine at load 11-18): lone-client p50 vs the same request in-process 1.1-1.5x at chunk_rows 2,
1.7-1.9x at 4, 4.1-4.5x for "pad" at 8 rows; in-process, 16 images chunked by 2 run at 62-67% of
the unchunked batch's throughput, by 4 at 72-91%, in 8-row padded calls at ~100%. The default is
"chunk" with 2 rows: the low-load latency, and a lone guided image's bytes are those of sampling
it alone in-process (one 2-row forward). `probe_chunked` checks
the chunk end to end before a version serves: the probe image alone, and at every position of
calls of every size up to a full one, must come out bitwise identical; else "per_sample".

Mode "kernels" makes the network itself batch-invariant instead (difforge.nets.invariant:
per-image GEMMs, every convolution as one tall image of the whole batch through oneDNN,
Model.with_backend("eager", kernels="invariant")), so a call of any size runs as it arrived, in
one network call per step, unpadded and unchunked. `probe_chunked` (without chunks, at
`kernel_probe_sizes`) checks it end to end like "chunk": alone, calls of several sizes, every
probed position of a full call. Measured on models/mnist-cond (`python -m benchmarks.serve_ab
--rounds 3 --duration 40 --modes kernels,chunk:2 --threads 1`, 10 guided steps, a quiet machine
at load 0.1-1.5, and a 2-round run before it): a lone client's p50 is 1.40x (1.31-1.55) and 1.36x
(1.34-1.39) the same request in-process, and 16 clients get 91.5% (89.9-99.8) and 103%
(102-105) of offline batched throughput with the default kernels; chunk_rows 2 in the same runs
1.15x / 1.23x alone but 73.1% / 73.1% at 16 clients. Both targets (<= 1.5x, >= 85%) are met
only by "kernels", so it is the default. (Under load 2.6-5.2 earlier the same day, with other
jobs running, kernels measured 1.46-1.73x and 72.5-81.7%: the serving and offline windows are
minutes apart and the load moved between them.) The bare net runs at 0.88-0.90x the default
kernels at batch 16-64 under load (0.86-1.07x per quiet round of offline sampling) and 0.66x at
batch 1, which is what a lone client pays. A "kernels" image's bytes are those of
Model.with_backend("eager", kernels="invariant"), not plain Model.sample's (the last bits of a
different summation order); "chunk" with 2 rows keeps a lone guided image's bytes equal to plain
Model.sample's. Every response's "batching" says which.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from difforge.pipeline import Model
from difforge.serving.batching import BatchKey, BatchPlan, Row, sample_rows


@dataclass(frozen=True)
class InvarianceReport:
    """One probe of one call shape."""

    rows: int  # images per sampler call
    guided: bool
    positions: tuple[int, ...]  # where the probe image was placed
    differing: tuple[int, ...]  # positions whose output was not bitwise equal to position 0's
    max_abs_diff: float  # over those positions, data space
    alone_max_abs_diff: float  # the probe image at `rows` vs alone in a call of 1 (informational)
    sizes_differing: tuple[int, ...] = ()  # "chunk": call sizes where it differed from alone
    chunk_rows: int | None = None  # "chunk": forward rows per network call

    @property
    def invariant(self) -> bool:
        return not self.differing and not self.sizes_differing


def probe_positions(rows: int) -> tuple[int, ...]:
    """Every position for small calls; first, second, middle and last for large ones."""
    if rows <= 8:
        return tuple(range(rows))
    return tuple(sorted({0, 1, rows // 2, rows - 1}))


def probe(model: Model, key: BatchKey, rows: int) -> InvarianceReport:
    """Place one probe image at each position of a `rows`-image call among other images.

    Runs `key`'s sampler for its steps (keep them few: this runs at start-up).
    """
    conds = model.spec.resolve({}, rows + 1)  # the spec's default rows (e.g. classes cycling)
    w = 3.0 if key.guided else 1.0
    target = Row(seed=12345, cond=conds[0], guidance=w)

    def neighbour(i: int, salt: int) -> Row:
        cond = conds[(i + salt) % len(conds)]
        return Row(seed=1000 * salt + i, cond=cond, guidance=w + (0.5 if key.guided else 0))

    positions = probe_positions(rows)
    outputs = []
    for p in positions:
        batch = [neighbour(i, p + 1) for i in range(rows)]
        batch[p] = target
        x, _ = sample_rows(model, key, batch)
        outputs.append(x[p])
    ref = outputs[0]
    diffs = [float((o - ref).abs().max()) for o in outputs]
    alone, _ = sample_rows(model, key, [target])
    return InvarianceReport(
        rows=rows,
        guided=key.guided,
        positions=positions,
        differing=tuple(
            p for p, o in zip(positions, outputs, strict=True) if not torch.equal(o, ref)
        ),
        max_abs_diff=max(diffs),
        alone_max_abs_diff=float((alone[0] - ref).abs().max()),
    )


def serving_model(model: Model, mode: str) -> Model:
    """The model a version samples with under `mode`: for "kernels", `model` with batch-invariant
    kernels (same weights, same sha256); for every other mode `model` itself."""
    if mode != "kernels" or getattr(model.backend, "invariant", False):
        return model
    return model.with_backend("eager", kernels="invariant")


def kernel_probe_sizes(rows: int) -> tuple[int, ...]:
    """Call sizes (images) probed for "kernels" besides 1 and `rows`: small ones and a middle."""
    return tuple(k for k in sorted({2, 3, 5, rows // 2, rows - 1}) if 2 <= k < rows)


def probe_chunked(
    model: Model,
    key: BatchKey,
    rows: int,
    chunk_rows: int | None,
    sizes: tuple[int, ...] | None = None,
) -> InvarianceReport:
    """The probe image alone in a call, then at the last position of calls of 2 .. rows - 1
    images (every layout of its forward rows over the chunks, up to 2 chunks' worth of images),
    then at every probed position of a full `rows`-image call, among different neighbours; the
    network runs in chunks of `chunk_rows` (None: one network call, mode "kernels", with the
    call `sizes` given). Every output must equal the alone one bitwise (`differing`: full-call
    positions, `sizes_differing`: call sizes, that did not).
    """
    conds = model.spec.resolve({}, rows + 1)
    w = 3.0 if key.guided else 1.0
    target = Row(seed=12345, cond=conds[0], guidance=w)

    def call(size: int, p: int, salt: int):
        batch = [
            Row(
                seed=1000 * salt + i,
                cond=conds[(i + salt) % len(conds)],
                guidance=w + 0.5 * key.guided,
            )
            for i in range(size)
        ]
        batch[p] = target
        return sample_rows(model, key, batch, chunk_rows=chunk_rows)[0][p]

    alone = call(1, 0, 0)
    if sizes is None:
        sizes = tuple(range(2, min(rows, 2 * chunk_rows + 1)))
    by_size = {k: call(k, k - 1, k) for k in sizes}
    positions = probe_positions(rows)
    full = {p: call(rows, p, 100 + p) for p in positions} if rows > 1 else {0: alone}
    diffs = [float((o - alone).abs().max()) for o in [*by_size.values(), *full.values()]]
    return InvarianceReport(
        rows=rows,
        guided=key.guided,
        positions=positions,
        differing=tuple(p for p, o in full.items() if not torch.equal(o, alone)),
        max_abs_diff=max(diffs, default=0.0),
        alone_max_abs_diff=max(diffs, default=0.0),
        sizes_differing=tuple(k for k, o in by_size.items() if not torch.equal(o, alone)),
        chunk_rows=chunk_rows,
    )


def choose_plan(
    model: Model,
    keys: Sequence[BatchKey],
    mode: str,
    max_rows: int,
    chunk_rows: int | None = None,
) -> BatchPlan:
    """The BatchPlan a version serves with: "pad", "chunk" (with `chunk_rows`) or "kernels" (on
    `serving_model(model, "kernels")`) if every probed shape is invariant, else "per_sample";
    "per_sample" and "off" are taken as asked (off is not probed)."""
    plan = BatchPlan(mode, max_rows, chunk_rows=chunk_rows if mode == "chunk" else None)
    if mode not in ("pad", "chunk", "kernels"):
        return plan
    if mode == "kernels":
        sizes = {k: kernel_probe_sizes(plan.micro(k.guided)) for k in keys}
        reports = [probe_chunked(model, k, plan.micro(k.guided), None, sizes[k]) for k in keys]
    elif mode == "chunk":
        reports = [probe_chunked(model, k, plan.micro(k.guided), chunk_rows) for k in keys]
    else:
        reports = [probe(model, k, plan.micro(k.guided)) for k in keys]
    ok = all(r.invariant for r in reports)
    info = {
        "requested": mode,
        "invariant": ok,
        "threads": torch.get_num_threads(),
        "reports": [asdict(r) for r in reports],
    }
    if ok:
        return BatchPlan(mode, max_rows, info, chunk_rows=plan.chunk_rows)
    return BatchPlan("per_sample", max_rows, info)
