"""The process group a command runs in: one process, or the N ranks torchrun started.

torchrun (torch.distributed.elastic) starts N copies of a command with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/MASTER_PORT and TORCHELASTIC_RESTART_COUNT in the environment. `session()`
joins that group; `current()` describes it. A command launched by torchrun that never joined the
group is an error, never N independent copies writing the same files.

Backends: "gloo" for CPU tensors; when every local rank has a GPU of its own, "cpu:gloo,cuda:nccl",
so collectives on CUDA tensors go through NCCL and those on CPU tensors through gloo. (The
Trainer and the samplers keep their tensors on the CPU today, so their collectives use gloo.)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from difforge.core.errors import DifforgeError, InvalidArgumentError


class DistributedError(DifforgeError):
    """The process group is missing, or the ranks disagree about something they must share."""


@dataclass(frozen=True)
class World:
    """This process's place in the group: rank in [0, size); restart counts torchrun restarts."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    restart: int = 0  # TORCHELASTIC_RESTART_COUNT: 0 on the first attempt

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def shard(self, n: int) -> slice:
        """This rank's contiguous, equal share of n items (n must divide evenly)."""
        if n % self.size:
            raise InvalidArgumentError(
                f"{n} is not divisible by the {self.size} processes; pick a multiple of {self.size}"
            )
        b = n // self.size
        return slice(self.rank * b, (self.rank + 1) * b)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def mean(self, x: Tensor) -> Tensor:
        """The mean of `x` over the ranks (sum, then divide: gloo has no AVG)."""
        if not self.distributed:
            return x
        y = x.detach().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y / self.size

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over the ranks, so every rank takes the same branch."""
        if not self.distributed:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def broadcast_ints(self, values: Sequence[int]) -> list[int]:
        """Rank 0's `values` on every rank (e.g. a randomly drawn seed); lengths must agree."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.int64)
        dist.broadcast(t, src=0)
        return t.tolist()

    def gather(self, x: Tensor) -> list[Tensor]:
        """Every rank's `x` (same dtype and trailing shape, any length along dim 0), by rank."""
        if not self.distributed:
            return [x]
        n = torch.tensor([x.shape[0]], dtype=torch.int64)
        sizes = [torch.zeros_like(n) for _ in range(self.size)]
        dist.all_gather(sizes, n)
        longest = max(int(s) for s in sizes)
        padded = torch.zeros((longest, *x.shape[1:]), dtype=x.dtype)
        padded[: x.shape[0]] = x
        out = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(out, padded.contiguous())
        return [t[: int(s)] for t, s in zip(out, sizes, strict=True)]

    def run_chunks(
        self,
        n: int,
        batch_size: int,
        call: Callable[[int, int], Tensor],
        item_shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.uint8,
    ) -> Tensor:
        """Items [0, n) in calls of `batch_size`: call i, `call(start, stop)`, runs on rank i % size
        and returns (stop - start, *item_shape) `dtype`; every rank gets all n, in order.
        item_shape defaults to that of rank 0's first call (rank 0 always makes one when n > 0).

        Each call has the shape a single process running the same chunks would use, so a
        batch-size-dependent kernel gives the same bytes whatever the number of ranks.
        """
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be at least 1, got {batch_size}")
        starts = list(range(0, n, batch_size))
        mine = [call(a, min(a + batch_size, n)) for a in starts[self.rank :: self.size]]
        if item_shape is None:
            item_shape = self._main_item_shape(mine)
        local = torch.cat(mine) if mine else torch.empty((0, *item_shape), dtype=dtype)
        per_rank = self.gather(local.to(dtype))
        taken = [0] * self.size
        out = []
        for i, a in enumerate(starts):
            r, m = i % self.size, min(a + batch_size, n) - a
            out.append(per_rank[r][taken[r] : taken[r] + m])
            taken[r] += m
        return torch.cat(out) if out else local

    def _main_item_shape(self, mine: list[Tensor]) -> tuple[int, ...]:
        shape = list(mine[0].shape[1:]) if mine else []
        if not self.distributed:
            return tuple(shape)
        slots = 8  # item dimensions carried; -1 pads
        if len(shape) > slots:
            raise InvalidArgumentError(f"items of more than {slots} dimensions: {shape}")
        dims = self.broadcast_ints(shape + [-1] * (slots - len(shape)))
        return tuple(d for d in dims if d >= 0)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "")
    try:
        return int(value) if value else default
    except ValueError:
        raise DistributedError(f"environment variable {name}={value!r} is not an integer") from None


def launched() -> World:
    """The group torchrun's environment variables describe (World() when not launched by it)."""
    return World(
        rank=_env_int("RANK", 0),
        size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        restart=_env_int("TORCHELASTIC_RESTART_COUNT", 0),
    )


def _own_gpu(env: World) -> bool:
    """This rank has a GPU of its own (NCCL refuses two ranks on one device)."""
    return torch.cuda.is_available() and env.local_rank < torch.cuda.device_count()


def default_backend() -> str:
    return "cpu:gloo,cuda:nccl" if _own_gpu(launched()) else "gloo"


def current() -> World:
    """The joined group, or World() in a plain process.

    Raises:
        DistributedError: launched by torchrun with WORLD_SIZE > 1 but the group was not joined
            (N copies would each act as the only process and overwrite each other's files).
    """
    env = launched()
    if dist.is_available() and dist.is_initialized():
        return World(dist.get_rank(), dist.get_world_size(), env.local_rank, env.restart)
    if env.distributed:
        raise DistributedError(
            f"launched as rank {env.rank} of {env.size} (torchrun) without joining the process "
            "group: call this inside difforge.common.distributed.session()"
        )
    return World()


@contextmanager
def session(backend: str | None = None) -> Iterator[World]:
    """Join torchrun's process group for the block (nothing to join in a plain process).

    Args:
        backend: torch.distributed backend [default_backend()].
    """
    env = launched()
    if not env.distributed or dist.is_initialized():
        yield current()
        return
    if _own_gpu(env):
        torch.cuda.set_device(env.local_rank)
    dist.init_process_group(backend or default_backend())
    try:
        yield current()
    finally:
        dist.destroy_process_group()
