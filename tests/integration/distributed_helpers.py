"""Launch difforge under a real torchrun with 2 gloo processes on the CPU (for the slow tests)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from PIL import Image

from tests.helpers import TINY_NET

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _command(args, nproc: int, extra: tuple, env: dict | None) -> tuple[list[str], dict]:
    environ = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"} | (env or {})
    cmd = [str(TORCHRUN), "--standalone", f"--nproc_per_node={nproc}", *extra, *map(str, args)]
    return cmd, environ


def torchrun(*args, nproc: int = 2, extra: tuple = (), env: dict | None = None, timeout=300):
    """`torchrun --standalone --nproc_per_node nproc [extra] args`; the worktree's code first."""
    cmd, environ = _command(args, nproc, extra, env)
    return subprocess.run(
        cmd, cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout
    )


def torchrun_background(*args, nproc: int = 2) -> subprocess.Popen:
    """The same launch, running in the background (output discarded)."""
    cmd, environ = _command(args, nproc, (), None)
    return subprocess.Popen(
        cmd, cwd=ROOT, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )


def band_folder(root: Path) -> Path:
    """3 classes x 8 images of 8x8 bands, as an image folder."""
    for k, name in enumerate(["a", "b", "c"]):
        (root / "images" / name).mkdir(parents=True, exist_ok=True)
        for i in range(8):
            img = Image.new("L", (8, 8), 30 + 3 * i)
            img.paste(220, (0, 2 * k, 8, 2 * k + 3))
            img.save(root / "images" / name / f"{i}.png")
    return root / "images"


def band_config(root: Path, **overrides) -> Path:
    config = {
        "net": TINY_NET,
        "dataset": {"kind": "folder", "path": str(band_folder(root)), "size": 8},
        "batch_size": 8,
        "max_steps": 12,
        "log_every": 2,
        "checkpoint_every": 4,
        "keep_last": 5,
        "sampling": {"steps": 3},
        "optim": {"lr": 2e-3, "warmup_steps": 3},
    } | overrides
    config["dataset"]["mode"] = "grayscale"
    path = root / "config.json"
    path.write_text(json.dumps(config))
    return path
