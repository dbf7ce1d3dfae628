"""Crash-safe training checkpoints: safetensors + JSON, published by atomic rename.

    RUN/checkpoints/step-000000200/
      tensors.safetensors   net.*, ema.*, optim.* and rng.* tensors (torch RNG states are uint8)
      state.json            step, config, dataset hash, counters, numpy/python RNG states
      COMPLETE              sha256 of the two files above; written last

A checkpoint is built in a hidden temp folder, every file fsynced, then renamed into place. A
folder without a valid COMPLETE marker (a crash mid-write) is never resumed from, and the newest
complete one wins. No pickle anywhere: RNG states are tensors or JSON lists.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from difforge.common.atomic import atomic_folder
from difforge.core.errors import DifforgeError
from difforge.pipeline import sha256_file

FORMAT = "difforge-checkpoint/1"
TENSORS, STATE, MARKER = "tensors.safetensors", "state.json", "COMPLETE"
_NAME = re.compile(r"^step-(\d{9,})$")


class CheckpointError(DifforgeError):
    """A checkpoint cannot be written or does not fit the run resuming from it."""


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_checkpoint(
    run_dir: str | Path,
    step: int,
    tensors: Mapping[str, Tensor],
    state: Mapping[str, Any],
    keep_last: int,
) -> Path:
    """Publish a checkpoint for `step` atomically, then keep only the newest `keep_last`.

    Raises CheckpointError (and writes nothing) if any floating-point tensor is non-finite.
    """
    bad = [k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"refusing to write checkpoint at step {step}: non-finite values in {', '.join(bad[:5])}"
        )
    root = checkpoint_dir(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    if (final / MARKER).is_file():
        return final  # this step is already saved
    # an existing `final` is an incomplete leftover of a crashed write: replaced
    try:
        with atomic_folder(final, tmp=root / f".tmp-step-{step:09d}-{os.getpid()}") as tmp:
            _build(tmp, step, tensors, state)
    except OSError as e:  # disk full, quota, I/O error: atomic_folder removed the temp folder
        raise CheckpointError(
            f"cannot write the checkpoint of step {step} in {root}: "
            f"{e.strerror or e}; the partial copy was removed and the previous checkpoint is intact"
        ) from None
    prune_checkpoints(run_dir, keep_last)
    return final


def _build(tmp: Path, step: int, tensors: Mapping[str, Tensor], state: Mapping[str, Any]) -> None:
    """Write the checkpoint's files into the temp folder `tmp`, the marker last."""
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / TENSORS))
    (tmp / STATE).write_text(json.dumps(state, indent=1, sort_keys=True))
    os.chmod(tmp / TENSORS, (tmp / STATE).stat().st_mode & 0o777)  # safetensors writes 0600
    marker = {
        "format": FORMAT,
        "step": step,
        "files": {n: sha256_file(tmp / n) for n in (TENSORS, STATE)},
    }
    (tmp / MARKER).write_text(json.dumps(marker))


def _remove(path: Path) -> None:
    """Delete a checkpoint folder, its marker first: a kill half-way leaves an unmarked folder,
    which is never resumed from and which `remove_debris` deletes later."""
    (path / MARKER).unlink(missing_ok=True)
    shutil.rmtree(path, ignore_errors=True)


def _is_complete(path: Path) -> bool:
    """The marker exists and both files match the hashes it records."""
    try:
        marker = json.loads((path / MARKER).read_text())
        return all(sha256_file(path / name) == digest for name, digest in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def list_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint folder that has a marker, oldest first (not verified)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / MARKER).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete, hash-verified checkpoint; partial or corrupted ones are skipped."""
    for _, path in reversed(list_checkpoints(run_dir)):
        if _is_complete(path):
            return path
    return None


def prune_checkpoints(run_dir: str | Path, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of other writers
    (temp folders, folders without a marker)."""
    for _, path in list_checkpoints(run_dir)[:-keep_last]:
        _remove(path)
    remove_debris(run_dir, keep=f"-{os.getpid()}")


def remove_debris(run_dir: str | Path, keep: str | None = None) -> list[Path]:
    """Delete temp folders (except names ending in `keep`) and step folders with no COMPLETE
    marker: the remains of a crashed write or of a kill during pruning. Call it only while
    holding the run's lock (difforge.training.runlock), so no other writer is mid-checkpoint.

    Returns:
        The folders removed.
    """
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    removed = []
    for p in root.iterdir():
        stale_tmp = p.name.startswith(".tmp-step-") and not (keep and p.name.endswith(keep))
        unmarked = _NAME.match(p.name) is not None and not (p / MARKER).is_file()
        if p.is_dir() and (stale_tmp or unmarked):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, state) of a checkpoint folder."""
    path = Path(path)
    try:
        tensors = load_file(str(path / TENSORS))
        state = json.loads((path / STATE).read_text())
    except (OSError, SafetensorError, json.JSONDecodeError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: unknown checkpoint format {state.get('format')!r}")
    return tensors, state


def subset(tensors: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under `prefix`, with the prefix removed (e.g. 'net.' -> a state dict)."""
    return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}


def rng_state(generator: torch.Generator) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Every RNG the training loop may touch: torch's (uint8 tensors), numpy's and Python's (JSON)."""
    tensors = {"rng.torch": torch.get_rng_state(), "rng.train": generator.get_state()}
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return tensors, {
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "python": [version, list(internal), gauss_next],
    }


def set_rng_state(
    generator: torch.Generator, tensors: Mapping[str, Tensor], states: Mapping[str, Any]
) -> None:
    """Restore what `rng_state` saved."""
    torch.set_rng_state(tensors["rng.torch"])
    generator.set_state(tensors["rng.train"])
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
