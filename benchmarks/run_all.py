"""`make bench`: run every benchmark in turn (each writes JSON and a RESULTS.md row).

Run on a quiet machine: any other job on the cores distorts the numbers by far more than the
differences being measured. `--quick` runs shortened versions to check that they work.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

BENCHMARKS = {
    "sampler_overhead": (["--rounds", "5"], ["--rounds", "1", "--steps", "5"]),
    "adapter_overhead": ([], ["--calls", "3", "--steps", "5"]),
    "quality_vs_nfe": ([], ["--quick"]),
    "guidance_sweep": ([], ["--quick"]),
    "serve_load": ([], ["--quick"]),
    "time_to_quality": ([], ["--quick"]),
    "onnx_loop": ([], ["--batches", "1", "--rounds", "1"]),
    "compile": (["--cache"], ["--batches", "1", "--rounds", "1", "--variants", "channels_last"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("names", nargs="*", help=f"subset of {', '.join(BENCHMARKS)}")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    failed = []
    for name in args.names or BENCHMARKS:
        if name not in BENCHMARKS:
            print(f"unknown benchmark {name!r}; allowed: {', '.join(BENCHMARKS)}", file=sys.stderr)
            return 2
        script = ROOT / "benchmarks" / f"{name}.py"
        if not script.exists():
            print(f"-- {name}: not written yet, skipped")
            continue
        extra = BENCHMARKS[name][1 if args.quick else 0]
        print(f"-- {name}", flush=True)
        rc = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *extra], cwd=ROOT)
        if rc != 0:
            failed.append(name)
    if failed:
        print("failed:", ", ".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
