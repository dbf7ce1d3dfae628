"""Atomic writes: a reader sees the old file (or folder) or the new one, never half of one.

Files are written to a temp file beside the destination, flushed and fsynced, then renamed over
it with `os.replace`; folders are built in a temp sibling folder, every file and the folder
fsynced, then renamed into place. The parent folder is fsynced after the rename so the new name
itself survives a power cut. A crash leaves at most a hidden temp sibling behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Literal


def fsync_path(path: str | Path) -> None:
    """fsync a file or a folder by path (a folder's fsync makes its entries durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | Path, *, mode: int | None = None) -> Iterator[BinaryIO]:
    """Open a temp file beside `path` for binary writing; on success it replaces `path`.

    Creates the parent folders. If the block raises, the temp file is removed and `path` is
    left as it was.

    Args:
        path: the destination.
        mode: permission bits for the new file (e.g. 0o444); default: mkstemp's 0o600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically (temp file, fsync, rename); returns `path`."""
    with atomic_file(path) as f:
        f.write(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to `path` atomically; returns `path`."""
    return write_bytes_atomic(path, text.encode())


def _fsync_tree(folder: Path) -> None:
    """fsync every regular file below `folder` (links are not followed), then the folders."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            p = Path(root, name)
            if not p.is_symlink():
                fsync_path(p)
        for name in dirs:
            fsync_path(Path(root, name))
    fsync_path(folder)


def _publish(tmp: Path, dest: Path, if_exists: Literal["replace", "keep"]) -> None:
    """Rename the finished `tmp` to `dest`; an existing `dest` is replaced or kept."""
    if not dest.exists():
        try:
            tmp.rename(dest)
            return
        except OSError:  # someone else published `dest` meanwhile
            if not dest.exists():
                raise
    if if_exists == "keep":
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = dest.with_name(f".{dest.name}.old-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(old, ignore_errors=True)
    dest.rename(old)
    try:
        tmp.rename(dest)
    except BaseException:
        old.rename(dest)  # put the previous folder back
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_folder(
    dest: str | Path,
    *,
    tmp: str | Path | None = None,
    if_exists: Literal["replace", "keep"] = "replace",
) -> Iterator[Path]:
    """Build a folder in a temp sibling and, if the block succeeds, rename it to `dest`.

    On success every file in the temp folder and the folder itself are fsynced before the
    rename, and `dest`'s parent after it. If the block raises, the temp folder is removed and
    `dest` is untouched.

    Args:
        dest: the folder to publish.
        tmp: the temp folder (a sibling of `dest`, so the rename stays on one file system);
            default `.<name>.tmp-<pid>-<thread>`. A leftover of a crashed build is removed first.
        if_exists: "replace" an existing `dest` (renamed aside, then deleted), or "keep" it and
            discard the new build (another writer got there first with an equivalent folder).

    Yields:
        The empty temp folder to fill.
    """
    dest = Path(dest)
    tmp = Path(tmp) if tmp is not None else None
    tmp = tmp or dest.with_name(f".{dest.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _fsync_tree(tmp)
        _publish(tmp, dest, if_exists)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_path(dest.parent)
