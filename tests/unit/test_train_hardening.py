"""Run-folder lock, disk full during a checkpoint, and checkpoints half-deleted by a kill (#15)."""

from __future__ import annotations

import errno
import os

import pytest

from difforge.training import CheckpointError, latest_checkpoint, list_checkpoints, train
from difforge.training import checkpoint as ckpt
from difforge.training.runlock import RunLocked, run_lock
from tests.unit.test_train_loop import tiny_config, tiny_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_second_trainer_on_the_same_run_folder_exits_naming_the_holder(tmp_path):
    cfg, data = tiny_config(max_steps=5), tiny_dataset()
    with run_lock(tmp_path):  # the first trainer, as another process would hold it
        with pytest.raises(RunLocked) as err:
            train(cfg, tmp_path, dataset=data, progress=False)
        with pytest.raises(RunLocked):
            train(cfg, tmp_path, dataset=data, resume=True, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and f"pid {os.getpid()} on " in msg and "in use by another" in msg
    assert not (tmp_path / "checkpoints").exists()  # the second trainer touched nothing
    assert train(cfg, tmp_path, dataset=data, progress=False).step == 5  # released: it runs


def test_disk_full_during_a_checkpoint_is_one_line_and_leaves_no_temp_folder(tmp_path, monkeypatch):
    cfg, data = tiny_config(), tiny_dataset()
    train(cfg, tmp_path, dataset=data, until_step=5, progress=False)
    good = latest_checkpoint(tmp_path)
    real_save = ckpt.save_file

    def full_disk(tensors, path, **kw):
        with open(path, "wb") as f:
            f.write(b"\0" * 100)  # part of the file made it to disk
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    with pytest.raises(CheckpointError) as err:
        train(cfg, tmp_path, dataset=data, resume=True, progress=False)
    msg = str(err.value)
    assert "\n" not in msg and "No space left on device" in msg and "step 10" in msg
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == [good.name]
    assert latest_checkpoint(tmp_path) == good
    monkeypatch.setattr(ckpt, "save_file", real_save)
    assert train(cfg, tmp_path, dataset=data, resume=True, progress=False).step == 10


def test_a_checkpoint_half_deleted_by_a_kill_during_pruning_is_cleaned_up(tmp_path, monkeypatch):
    cfg, data = tiny_config(checkpoint_every=2, keep_last=1), tiny_dataset()
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *a, **k: None)  # killed before rmtree
    train(cfg, tmp_path, dataset=data, until_step=4, progress=False)
    root = tmp_path / "checkpoints"
    half = root / "step-000000002"
    assert half.is_dir() and not (half / ckpt.MARKER).exists()  # the marker goes first
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    monkeypatch.undo()
    train(cfg, tmp_path, dataset=data, resume=True, until_step=6, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["step-000000006"]


def test_safetensors_files_get_the_same_mode_as_the_rest(tmp_path):
    train(tiny_config(max_steps=5), tmp_path, dataset=tiny_dataset(), progress=False)
    (ckpt_dir,) = [p for _, p in list_checkpoints(tmp_path)]
    for folder, weights, other in (
        (tmp_path / "model", "model.safetensors", "config.json"),
        (ckpt_dir, ckpt.TENSORS, ckpt.STATE),
    ):
        mode = (folder / weights).stat().st_mode & 0o777
        assert mode == (folder / other).stat().st_mode & 0o777, (folder, oct(mode))
