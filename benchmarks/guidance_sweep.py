"""Label accuracy and FID against the classifier-free guidance scale, on the default model.

    python -m benchmarks.guidance_sweep [--model models/mnist-cond] [--guidance 1,2,3,5,8]
        [--sampler SAMPLER] [--steps STEPS] [--n 2000] [--threads 1] [--quick]

Every scale draws the same n images (same labels, balanced over the classes, and the same noise
seeds), with the model's default sampler and steps unless given, so the points are paired. Label
accuracy is the shipped MNIST classifier's agreement with the requested class; FID and KID are
against MNIST test. Guidance w = 1 is the plain conditional model (one forward per NFE); w != 1
costs two (conditional and unconditional, one batched call).

Budget: at 20 steps, 20 + 4 x 40 = 180 image forwards per image, ~7 ms each on the 2-core dev
CPU: n = 2000 takes about 42 minutes. `--quick` (n = 130, 5 steps, an untrained tiny model when
--model is missing) checks the pipeline in about a minute.

Writes results/guidance_sweep.json, a RESULTS.md row and results/guidance_sweep.png (FID and
KID on the left axis, label accuracy on the right).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, write_result
from benchmarks.quality_vs_nfe import load_model_or_tiny
from difforge.evaluation import DifforgeMethod, image_seeds, load_feature_extractor, make_labels
from difforge.evaluation.against import default_reference
from difforge.evaluation.records import describe_model
from difforge.evaluation.sweep import PointInputs, evaluate_point
from difforge.evaluation.threads import compute_threads

ROOT = Path(__file__).resolve().parent.parent


def plot(points: list[dict], title: str, path: Path) -> Path:
    """FID (log scale) against guidance, with label accuracy on a second axis."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    w = [p["guidance"] for p in points]
    ax.plot(w, [p["metrics"]["fid"] for p in points], "o-", color="tab:blue", label="FID")
    ax.set_yscale("log")
    ax.set_xlabel("classifier-free guidance scale w (1 = conditional)")
    ax.set_ylabel("FID vs MNIST test (lower is better)", color="tab:blue")
    ax.set_xticks(w, [f"{v:g}" for v in w])
    ax.grid(alpha=0.3)
    acc = ax.twinx()
    acc.plot(w, [p["metrics"]["label_accuracy"] for p in points], "s--", color="tab:red")
    acc.set_ylabel("label accuracy (higher is better)", color="tab:red")
    acc.set_ylim(0, 1.02)
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="model folder [models/mnist-cond]")
    ap.add_argument("--guidance", default="1,2,3,5,8", help="scales to evaluate")
    ap.add_argument("--sampler", default=None, help="[the model's default]")
    ap.add_argument("--steps", type=int, default=None, help="[the model's default; quick 5]")
    ap.add_argument("--n", type=int, default=None, help="images per scale [2000; quick 130]")
    ap.add_argument("--batch-size", type=int, default=250)
    ap.add_argument("--threads", type=int, default=1, help="torch + BLAS threads [1]")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    with compute_threads(args.threads):  # for the whole run, so RESULTS.md records them
        return run(args)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, note = load_model_or_tiny(args.model, args.quick)
    if not model.num_classes:
        print(f"error: {model.name} is unconditional: no guidance to sweep", file=sys.stderr)
        return 2
    n = args.n or (130 if args.quick else 2000)
    steps = args.steps or (5 if args.quick else model.config.sampling.steps)
    sampler = args.sampler or model.config.sampling.sampler
    scales = [float(v) for v in args.guidance.split(",")]
    points = []
    extractor = load_feature_extractor()
    reference = default_reference("test", extractor)
    labels = make_labels("balanced", n, model.num_classes, seed=0)
    inputs = PointInputs(labels, image_seeds(0, n), extractor, reference, 0, args.batch_size)
    for w in scales:
        p = evaluate_point(DifforgeMethod(model, sampler, guidance=w), steps, inputs)
        points.append(p | {"guidance": w})
        m = p["metrics"]
        print(
            f"w={w:g}: fid {m['fid']:.4g}, kid {m['kid_mean']:.4g}, label accuracy "
            f"{m['label_accuracy']:.3f} [{p['timings_s']['sampling']:.0f}s]",
            file=sys.stderr,
        )
    stem = "guidance_sweep_quick" if args.quick else "guidance_sweep"
    title = f"{model.name} ({model.sha256[:12]}): {sampler} {steps} steps, n = {n}"
    png = plot(points, title, RESULTS_DIR / f"{stem}.png")
    best = min(points, key=lambda p: p["metrics"]["fid"])
    rows = [
        f"w={p['guidance']:g} FID {p['metrics']['fid']:.3g} acc {p['metrics']['label_accuracy']:.3f}"
        for p in points
    ]
    summary = (
        ("QUICK (plumbing only): " if note else "")
        + f"{model.name}, {sampler} {steps} steps, n={n}: "
        + "; ".join(rows)
        + f"; best FID at w={best['guidance']:g}"
    )
    payload = {
        "model": describe_model(model), "model_note": note, "sampler": sampler, "steps": steps,
        "num_samples": n, "labels": "balanced", "seed": 0, "extractor": {"name": extractor.name,
        "sha256": extractor.sha256}, "reference": reference.describe(), "points": points,
        "plot": str(png.relative_to(ROOT)), "wall_time_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = write_result(stem, payload, summary)
    print(summary)
    print(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
