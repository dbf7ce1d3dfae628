"""Generation in fixed-size sampler calls, spread over torchrun's ranks and gathered.

`generate_chunked(model, plan, batch_size)` draws a plan in calls of `batch_size` images. In one
process the calls run one after another; under torchrun call i runs on rank i % N and every rank
gets all images. Image i depends only on its seed and conditioning (per-sample noise), and every
call has the same shape as in one process, so the images are byte for byte those of a
single-process run with the same --batch-size. (A different batch size can change a pixel: conv
and matmul kernels may reduce in a batch-size-dependent order.)
"""

from __future__ import annotations

from dataclasses import replace

from difforge.common.distributed import World, current
from difforge.pipeline.model import Model, Samples
from difforge.pipeline.request import Plan

DEFAULT_BATCH = 64  # images per sampler call when none is given


def generate_chunked(
    model: Model,
    plan: Plan,
    batch_size: int | None = None,
    *,
    world: World | None = None,
    chunk_rows: int | None = None,
) -> Samples:
    """Run `plan` in sampler calls of `batch_size` images, sharded over the ranks.

    Args:
        model: the loaded model (the same on every rank).
        plan: the resolved request; rank 0's seeds win (a randomly drawn seed differs per rank).
        batch_size: images per sampler call [DEFAULT_BATCH].
        world: the torchrun group [the current one].
        chunk_rows: run the network on this many rows at a time (difforge.core.chunked): the
            images then do not depend on `batch_size` either, and are a server's bytes with
            batch_invariance "chunk" and the same chunk_rows.

    Returns:
        Samples of all plan.n images, on every rank.
    """
    world = world if world is not None else current()
    plan = replace(plan, seeds=tuple(world.broadcast_ints(plan.seeds)))
    nfe = [0]

    def call(start: int, stop: int):
        uncond = None if plan.uncond_rows is None else plan.uncond_rows[start:stop]
        edit = None if plan.edit is None else replace(plan.edit, rows=plan.edit.rows[start:stop])
        rows, seeds = plan.rows[start:stop], plan.seeds[start:stop]
        x, nfe[0] = model.sample_latents(
            rows, plan, seeds=seeds, uncond=uncond, edit=edit, chunk_rows=chunk_rows
        )
        return model.decode(x)

    size = batch_size or DEFAULT_BATCH
    images = world.run_chunks(plan.n, size, call, model.image_shape)
    return model.samples_of(plan, images, world.broadcast_ints(nfe)[0])
