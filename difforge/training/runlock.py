"""An exclusive lock on a training run folder: one trainer per `--out`.

Two trainers writing one run folder (two `difforge train --out same`, or `torchrun` launching a
non-distributed run N times) would prune each other's checkpoints. The first takes an advisory
`flock` on RUN/.lock and writes who it is into it; the OS drops the lock when that process exits,
however it exits, so a crash never leaves a stale lock behind. A second trainer fails at once with
one line naming the holder. Under torchrun, rank 0 takes it for the whole group (the other ranks
write nothing; difforge.training.distributed).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from difforge.core.errors import DifforgeError

LOCK_FILE = ".lock"


class RunLocked(DifforgeError):
    """Another trainer holds the run folder's lock."""


def _holder(path: Path) -> str:
    try:
        who = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        who = {}
    if not isinstance(who, dict) or "pid" not in who:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(who.get("since", 0)))
    return f"pid {who['pid']} on {who.get('host', '?')} (since {since})"


@contextlib.contextmanager
def run_lock(run_dir: str | Path) -> Iterator[Path]:
    """Hold RUN/.lock exclusively for the duration of the block.

    Raises:
        RunLocked: another live process holds it; the message names that process.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLocked(
                f"{run_dir} is in use by another trainer: {_holder(path)}; "
                "wait for it to finish or choose another --out"
            ) from None
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(me).encode(), 0)
        yield path
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new holder)
