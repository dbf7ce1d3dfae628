"""Atomic files and folders: the old version or the new one, never a mix, and no leftovers."""

from __future__ import annotations

import os
import stat

import pytest

from difforge.common.atomic import (
    atomic_file,
    atomic_folder,
    write_bytes_atomic,
    write_text_atomic,
)


def test_write_creates_parents_and_replaces_without_leftovers(tmp_path):
    path = tmp_path / "a" / "b" / "report.json"
    write_text_atomic(path, "one")
    assert write_bytes_atomic(path, b"two") == path
    assert path.read_bytes() == b"two"
    assert sorted(os.listdir(path.parent)) == ["report.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "x.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("crash")
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["x.bin"]


def test_atomic_file_sets_the_mode(tmp_path):
    path = tmp_path / "blob"
    with atomic_file(path, mode=0o444) as f:
        f.write(b"x")
    assert stat.S_IMODE(path.stat().st_mode) == 0o444


def test_a_folder_is_published_whole_and_replaces_an_existing_one(tmp_path):
    dest = tmp_path / "model"
    with atomic_folder(dest) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.tmp-")
        (tmp / "config.json").write_text("1")
        assert not dest.exists()  # nothing visible until the block ends
    with atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("2")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"w")
    assert (dest / "config.json").read_text() == "2" and (dest / "sub" / "w.bin").is_file()
    assert os.listdir(tmp_path) == ["model"]  # the old copy and the temp folder are gone


def test_a_failed_folder_build_leaves_the_old_folder_and_no_temp(tmp_path):
    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    with pytest.raises(ValueError), atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("new")
        raise ValueError("bad weights")
    assert (dest / "config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["model"]


def test_keep_discards_the_new_build_when_the_folder_exists(tmp_path):
    dest = tmp_path / "links"
    with atomic_folder(dest, tmp=tmp_path / ".mine") as tmp:
        (tmp / "f").write_text("mine")
        dest.mkdir()  # another writer publishes first
        (dest / "f").write_text("theirs")
    with atomic_folder(dest, if_exists="keep") as tmp:
        (tmp / "f").write_text("later")
    assert (dest / "f").read_text() == "mine"  # replace (the default) won, keep kept it
    assert os.listdir(tmp_path) == ["links"]


def test_a_stale_temp_folder_is_cleared_and_links_are_kept_as_links(tmp_path):
    (tmp_path / "target").write_text("blob")
    stale = tmp_path / ".tmp-step-1"
    stale.mkdir()
    (stale / "junk").write_text("from a crash")
    with atomic_folder(tmp_path / "step-1", tmp=stale) as tmp:
        assert list(tmp.iterdir()) == []
        (tmp / "link").symlink_to(tmp_path / "target")
    assert (tmp_path / "step-1" / "link").is_symlink()


def test_a_failed_swap_puts_the_old_folder_back(tmp_path, monkeypatch):
    from pathlib import Path

    dest = tmp_path / "model"
    dest.mkdir()
    (dest / "config.json").write_text("old")
    real_rename = Path.rename

    def rename(self, target):
        if self.name.startswith(".model.tmp-"):
            raise OSError("disk gone")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OSError, match="disk gone"), atomic_folder(dest) as tmp:
        (tmp / "config.json").write_text("new")
    assert (dest / "config.json").read_text() == "old"
    assert os.listdir(tmp_path) == ["model"]
