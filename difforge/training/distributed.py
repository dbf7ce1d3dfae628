"""Data-parallel training under torchrun: DDP, per-rank shards of each batch, elastic restarts.

How a step is split so that N processes at global batch B compute what one process at batch B
does (up to float summation order):

- every rank draws the same global batch of B indices from the epoch's permutation (a function of
  (seed, epoch)) and the same B noise levels, noise tensors and CFG drops from the training
  generator, whose state therefore stays identical on every rank (rank 0's checkpoint restores
  them all);
- rank r keeps items [r * B/N, (r+1) * B/N): each epoch is split into disjoint shards;
- DistributedDataParallel averages the gradients of the per-rank mean losses, which equals the
  gradient of the mean over B. Not bit for bit: one process reduces over the batch inside the
  conv/linear backward kernels; N processes reduce B/N items there and then add N partial
  gradients in gloo's all-reduce, a different summation order (about 1e-7 relative per step,
  which Adam then carries forward).

Files are written by rank 0 only. A torchrun restart (TORCHELASTIC_RESTART_COUNT > 0) resumes
from the newest complete checkpoint, so `--max-restarts 1` survives a killed worker.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from difforge.common.distributed import DistributedError, World
from difforge.core.errors import InvalidArgumentError


def check_batch(batch_size: int, world: World) -> None:
    """The global batch must split evenly over the ranks."""
    if batch_size % world.size:
        raise InvalidArgumentError(
            f"batch_size {batch_size} does not split over {world.size} processes; the global "
            f"batch must be a multiple of {world.size}"
        )


def wrap(module: nn.Module, world: World) -> nn.Module:
    """`module` in DistributedDataParallel across the group (itself in a single process).

    Wrap the network, not the denoiser adapter: DDP synchronizes through the wrapped module's
    forward, and the adapter's loss_terms calls the network's.
    """
    if not world.distributed:
        return module
    return DistributedDataParallel(module)


def shard(
    world: World,
    x0: Tensor,
    sigma: Tensor,
    eps: Tensor,
    cond: Mapping[str, Tensor] | None,
) -> tuple[Tensor, Tensor, Tensor, dict[str, Tensor] | None]:
    """This rank's rows of a global batch (x0, sigma, eps (B, ...), cond {key: (B, ...)})."""
    if not world.distributed:
        return x0, sigma, eps, None if cond is None else dict(cond)
    s = world.shard(x0.shape[0])
    part = None if cond is None else {k: v[s] for k, v in cond.items()}
    return x0[s], sigma[s], eps[s], part


def resume_on_restart(resume: bool, world: World) -> bool:
    """A torchrun restart resumes from the newest checkpoint, even without --resume."""
    return resume or world.restart > 0


def check_same_step(step: int, world: World) -> None:
    """Every rank resumed from the same checkpoint (rank 0's step)."""
    main = world.broadcast_ints([step])[0]
    if main != step:
        raise DistributedError(
            f"rank {world.rank} resumed at step {step} but rank 0 at step {main}: the ranks must "
            "see the same run folder (a shared file system)"
        )
