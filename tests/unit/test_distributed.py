"""The process-group plumbing without a group: shards, a torchrun launch that never joined the
group refused before anything is written, batch checks."""

from __future__ import annotations

import pytest

from difforge.common.distributed import DistributedError, World, current, launched
from difforge.core.errors import InvalidArgumentError
from difforge.training import distributed as ddp
from difforge.training import parse_config, train
from tests.helpers import TINY_NET

TORCHRUN_ENV = {
    "RANK": "1",
    "WORLD_SIZE": "2",
    "LOCAL_RANK": "1",
    "TORCHELASTIC_RESTART_COUNT": "0",
}


def test_shards_are_disjoint_and_cover_the_batch():
    covered = []
    for rank in range(4):
        s = World(rank=rank, size=4).shard(12)
        covered += list(range(12))[s]
    assert covered == list(range(12))
    with pytest.raises(InvalidArgumentError, match="multiple of 4"):
        World(rank=0, size=4).shard(10)


def test_a_single_process_world_needs_no_group():
    w = World()
    assert w.is_main and not w.distributed
    assert w.any(True, False) == (True, False)
    assert w.broadcast_ints([7]) == [7]
    assert current() == World()


def test_torchrun_environment_is_read(monkeypatch):
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert launched() == World(rank=1, size=2, local_rank=1, restart=1)
    assert ddp.resume_on_restart(False, launched())
    assert not ddp.resume_on_restart(False, World())


def test_a_torchrun_launch_without_the_group_trains_nothing(monkeypatch, tmp_path):
    for k, v in TORCHRUN_ENV.items():
        monkeypatch.setenv(k, v)
    config = parse_config({"net": TINY_NET, "dataset": "bands", "batch_size": 8})
    with pytest.raises(DistributedError, match="without joining the process group"):
        train(config, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_global_batch_must_split_over_the_ranks():
    with pytest.raises(InvalidArgumentError, match="multiple of 3"):
        ddp.check_batch(8, World(rank=0, size=3))
    ddp.check_batch(8, World(rank=0, size=2))
