"""Data-parallel training under torchrun on the CPU: 1 vs 2 gloo processes at the same global
batch, and an elastic restart after SIGKILLing one worker from outside.

    python -m benchmarks.scale_out [--steps 300] [--checkpoint-every 50] [--kill-after 100]

On the 8x8 band images of the distributed tests (tests/integration/distributed_helpers.py) with
the tiny U-Net: (1) `difforge train` in one process and under `torchrun --nproc_per_node 2`,
reporting wall time and how far the final weights are apart (not bitwise: the gradient sum order
differs); (2) the same 2-process run with `--max-restarts 1`, whose rank-1 worker this script
kills with SIGKILL once the --kill-after checkpoint exists; its final checkpoint must equal the
uninterrupted 2-process run's bit for bit. On 2 shared cores both processes share the CPU, so the
2-process wall time measures overhead, not speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from difforge.training import list_checkpoints, read_checkpoint
from tests.integration.distributed_helpers import ROOT, TORCHRUN, band_config


def _env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _train_cmd(config: Path, out: Path) -> list[str]:
    return [
        "-m",
        "difforge.cli",
        "train",
        "--config",
        str(config),
        "--out",
        str(out),
        "--no-progress",
    ]


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=_env(), check=True, capture_output=True, text=True)
    return time.perf_counter() - t0


def _final(run: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(list_checkpoints(run)[-1][1])[0]


def _diff(a: dict, b: dict) -> dict:
    keys = [k for k in a if k.startswith("net.")]
    worst = max((a[k] - b[k]).abs().max().item() for k in keys)
    scale = max(a[k].abs().max().item() for k in keys)
    equal = sum(torch.equal(a[k], b[k]) for k in keys)
    return {
        "max_abs": worst,
        "max_abs_over_max_weight": worst / scale,
        "equal": f"{equal}/{len(keys)}",
    }


def _rank_pid(agent: int, rank: int) -> int | None:
    """The pid of torchrun worker `rank` (a child of the agent with RANK=rank)."""
    try:
        children = Path(f"/proc/{agent}/task/{agent}/children").read_text().split()
    except OSError:
        return None
    for pid in children:
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(pid)
    return None


def _killed_run(config: Path, out: Path, kill_after: int) -> dict:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node=2", "--max-restarts=1"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd + _train_cmd(config, out), cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    killed_at = None
    while proc.poll() is None and killed_at is None:
        if any(s >= kill_after for s, _ in list_checkpoints(out)):
            pid = _rank_pid(proc.pid, 1)
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
                killed_at = max(s for s, _ in list_checkpoints(out))
        time.sleep(0.05)
    log, _ = proc.communicate()
    resumed = [line for line in log.splitlines() if "resumed from" in line]
    return {
        "returncode": proc.returncode,
        "killed_after_checkpoint": killed_at,
        "resumed": resumed[-1].split("]:")[-1].strip() if resumed else None,
        "wall_s": round(time.perf_counter() - t0, 2),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--checkpoint-every", type=int, default=50)
    p.add_argument("--kill-after", type=int, default=100)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config = band_config(root, max_steps=args.steps, checkpoint_every=args.checkpoint_every)
        one_s = _timed([sys.executable, *_train_cmd(config, root / "one")])
        two_s = _timed(
            [str(TORCHRUN), "--standalone", "--nproc_per_node=2", *_train_cmd(config, root / "two")]
        )
        killed = _killed_run(config, root / "killed", args.kill_after)
        one, two, again = _final(root / "one"), _final(root / "two"), _final(root / "killed")
        restart_equal = all(torch.equal(two[k], again[k]) for k in two)
        payload = {
            "config": json.loads(config.read_text()),
            "one_process_s": round(one_s, 2),
            "two_process_s": round(two_s, 2),
            "one_vs_two": _diff(one, two),
            "elastic": killed | {"final_equal_to_uninterrupted": restart_equal},
        }
    d, e = payload["one_vs_two"], payload["elastic"]
    summary = (
        f"tiny U-Net, 8x8 bands, global batch 8, {args.steps} steps: 1 process {one_s:.1f} s, "
        f"2 gloo processes {two_s:.1f} s (2 shared cores); 1 vs 2 max |dw| {d['max_abs']:.2g} "
        f"({d['max_abs_over_max_weight']:.2g} of the largest weight, {d['equal']} tensors equal); "
        f"SIGKILL rank 1 after checkpoint {e['killed_after_checkpoint']}: rc {e['returncode']}, "
        f"final weights bitwise equal to the uninterrupted run: {restart_equal}"
    )
    write_result("scale_out", payload, summary)
    print(summary)


if __name__ == "__main__":
    main()
