"""Class-conditional generation of UCR series: Frechet distance, label accuracy, memorization.

    python -m benchmarks.series_quality [--sets GunPoint:128,ItalyPowerDemand:24] [--steps 1500]
        [--n 200] [--seed 0] [--threads 1] [--quick]

For each set: a class-conditional unet1d (the anomaly detector's net, with the set's classes and
a learned null class) is trained on the archive's TRAIN file (z-normalised per series, resampled
to the given length), EDM with sigma_data 1, batch 16, cond_dropout 0.1. A 1-D CNN feature net
(`difforge.evaluation.series`) is trained on the same TRAIN file. n series are drawn with the
model's defaults (dpmpp_2m, 20 steps) at guidance 1 and 2, labels balanced, seeds seed..seed+n-1,
and compared with the TEST file: FD-series (Frechet distance on the feature net's 32-d pooled
features), label accuracy of the samples under the feature net, memorization against TRAIN. The
floor is the same distance between TRAIN and TEST themselves; the classifier's TEST accuracy
says how much its labels can be trusted.

Budget (2-core shared CPU, 1 thread): ~2-3 minutes per set. `--quick` (100 steps, n 40,
GunPoint) checks the pipeline and writes nothing. Otherwise writes results/series_quality.json
and a RESULTS.md row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write_result
from difforge.data import load_ucr
from difforge.evaluation.series import evaluate_series, train_series_classifier
from difforge.pipeline import load
from difforge.training.anomaly import default_net
from difforge.training.config import parse_config
from difforge.training.loop import train


def run_set(name: str, length: int, args, workdir: Path) -> dict:
    train_set = load_ucr(name, "train", length=length)
    test_set = load_ucr(name, "test", length=length)
    net = default_net(length)
    net["config"]["num_classes"] = train_set.num_classes
    config = parse_config(
        {
            "net": net,
            "dataset": {"kind": "ucr", "name": name, "split": "train", "length": length},
            "sigma_data": 1.0,
            "batch_size": min(16, len(train_set)),
            "max_steps": args.steps,
            "seed": args.seed,
            "log_every": 50,
            "checkpoint_every": args.steps,
            "keep_last": 1,
            "optim": {"lr": 2e-3, "warmup_steps": 100},
            "ema": {"halflife_images": 2000.0},
        }
    )
    t0 = time.process_time()
    result = train(config, workdir / name, dataset=train_set, progress=False)
    train_cpu = time.process_time() - t0
    model = load(result.model_dir)
    extractor = train_series_classifier(train_set, steps=400, seed=args.seed)
    row = {"set": name, "length": length, "n_train": len(train_set), "n_test": len(test_set)}
    row |= {"train_cpu_s": round(train_cpu, 1), "final_loss": result.loss}
    for w in (1.0, 2.0):
        kwargs = {"guidance": w}
        row[f"guidance_{w:g}"] = evaluate_series(
            model, extractor, test_set, train_set, n=args.n, seed=args.seed, sample_kwargs=kwargs
        )
    print(name, {k: v for k, v in row.items() if not k.startswith("guidance")}, flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default="GunPoint:128,ItalyPowerDemand:24")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sets, args.steps, args.n = "GunPoint:128", 100, 40
    workdir = Path(tempfile.mkdtemp(prefix="difforge-series-"))
    try:
        rows = [
            run_set(s.split(":")[0], int(s.split(":")[1]), args, workdir)
            for s in args.sets.split(",")
        ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    parts = []
    for r in rows:
        g1, g2 = r["guidance_1"], r["guidance_2"]
        parts.append(
            f"{r['set']}: FD-series {g1['fd_series']:.2f} (w=1) / {g2['fd_series']:.2f} (w=2) vs "
            f"train-test floor {g1['fd_series_floor_train_vs_reference']:.2f}; label acc "
            f"{g1['label_accuracy']:.3f} / {g2['label_accuracy']:.3f} (classifier on test "
            f"{g1['classifier_accuracy_on_reference']:.3f}); memorized "
            f"{g1['memorization']['memorization_rate']:.3f} / {g2['memorization']['memorization_rate']:.3f}"
        )
    summary = f"steps {args.steps}, n={args.n}, seed {args.seed}; " + "; ".join(parts)
    if not args.quick:
        print(write_result("series_quality", {"args": vars(args), "per_set": rows}, summary))
    print(summary)


if __name__ == "__main__":
    main()
