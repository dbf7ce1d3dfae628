"""Shared by every benchmark: machine description, JSON results, the RESULTS.md row."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
RESULTS_MD = HERE / "RESULTS.md"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "load_avg_1m": os.getloadavg()[0],
    }


def git_commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE
        ).stdout.strip()
    except OSError:
        return "unknown"


def command_line() -> str:
    """The command as run, with a script inside the repository named relative to its root."""
    argv = list(sys.argv)
    script = Path(argv[0]).resolve() if argv else None
    if script is not None and script.is_relative_to(HERE.parent):
        argv[0] = str(script.relative_to(HERE.parent))
    return " ".join([Path(sys.executable).name, *argv])


def write_result(name: str, payload: dict, summary: str) -> Path:
    """Write results/<name>.json and append one row to RESULTS.md."""
    RESULTS_DIR.mkdir(exist_ok=True)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    payload = {
        "benchmark": name,
        "date": now,
        "command": command_line(),
        "commit": git_commit(),
        "machine": machine(),
        **payload,
    }
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(payload, indent=2) + "\n")
    if not RESULTS_MD.exists():
        RESULTS_MD.write_text(
            "# Benchmark results\n\nOne row per run; the JSON under results/ has the details.\n\n"
            "| date | benchmark | machine | command | commit | result |\n|---|---|---|---|---|---|\n"
        )
    m = payload["machine"]
    where = f"{m['cpu']} ({m['cores']} cores, {m['torch_threads']} threads, load {m['load_avg_1m']:.1f})"
    with RESULTS_MD.open("a") as f:
        f.write(
            f"| {now} | {name} | {where} | `{payload['command']}` | {payload['commit']} | {summary} |\n"
        )
    return out
