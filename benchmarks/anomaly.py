"""Anomaly detection on labelled UCR sets: the diffusion reconstruction score vs pyod baselines.

    python -m benchmarks.anomaly [--sets GunPoint:128,ItalyPowerDemand:24,ArrowHead:256]
        [--steps 1000] [--seeds 0,1] [--threads 1] [--quick]

Protocol (one-class, as in UCR-based anomaly benchmarks): for each set and each class k, class
k is "normal" and every other class an anomaly. Series are read from the sktime wheel
(`difforge.data.load_ucr`), resampled to the given length and z-normalised per series. Only the
archive's TRAIN file is used for fitting: its class-k series are split 80/20 by a seeded
permutation (`difforge.training.anomaly.split_normals`). The diffusion model is trained on the
80% and uses the 20% to set its per-level scales and threshold. Each baseline is fitted twice:
on the same 80% ("<name>") and on all the class-k TRAIN series ("<name>_all", the fairer
comparison, since the diffusion score also uses the 20%); the best baseline is the best of both.
Every method is evaluated on the whole TEST file (never seen in fitting), anomalies positive:
ROC-AUC and PR-AUC (average precision). Each seed (`--seeds`) redraws the split, the diffusion
model's initialisation and the baselines' randomness; per-set numbers are means over classes
and seeds.

Methods: difforge = `fit_anomaly_detector` (a ~0.6M-parameter unet1d, EDM, `--steps` Adam steps
at batch 16) scored with the default `ScoreConfig` (sigma 0.1, 0.2, 0.4, 0.8 x 4 shared noise
draws, one denoiser call each). pyod 3.6.7 baselines on the flattened series: IsolationForest
(100 trees), KNN (k = 5, "largest" distance; and k = 1), AutoEncoder (pyod's default 64-32 MLP,
200 epochs instead of its default 10, since a class has only ~10-40 training series).
The prior on which baseline is strong: Livernoche et al. 2023 show k-NN is the non-parametric
limit of diffusion-time estimation, so KNN is the one to beat.

Budget (2-core shared dev CPU, 1 thread, measured at load ~5-10): 35-80 CPU-s per fit (24 to 256
points), 2.5-6 s to score a TEST file; the default three sets (7 classes) x 2 seeds took 43
minutes of wall time. `--quick` (60 steps, GunPoint only) checks the
pipeline in about a minute and writes nothing. Otherwise writes results/anomaly.json and a
RESULTS.md row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import write_result
from difforge.data import load_ucr
from difforge.evaluation.anomaly import average_precision, roc_auc
from difforge.training.anomaly import fit_anomaly_detector, split_normals

DEFAULT_SETS = "GunPoint:128,ItalyPowerDemand:24,ArrowHead:256"


def baselines(x_train: np.ndarray, x_test: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Test scores (higher = more anomalous) of the pyod detectors fitted on x_train (N, D)."""
    from pyod.models.auto_encoder import AutoEncoder
    from pyod.models.iforest import IForest
    from pyod.models.knn import KNN

    n = len(x_train)
    models = {
        "iforest": IForest(n_estimators=100, random_state=seed),
        "knn5": KNN(n_neighbors=min(5, n - 1)),
        "knn1": KNN(n_neighbors=1),
        "autoencoder": AutoEncoder(
            epoch_num=200, batch_size=min(32, n), random_state=seed, verbose=0, device="cpu"
        ),
    }
    out = {}
    for name, model in models.items():
        model.fit(x_train)
        out[name] = np.asarray(model.decision_function(x_test), dtype=np.float64)
    return out


def run_class(name: str, length: int, k: int, seed: int, args, workdir: Path) -> dict:
    train = load_ucr(name, "train", length=length)
    test = load_ucr(name, "test", length=length)
    fit_part, _ = split_normals(train, k, 0.2, seed)
    all_normals = train.series[train.labels == k].flatten(1).numpy()
    is_anomaly = (test.labels != k).numpy()
    t0 = time.process_time()
    det = fit_anomaly_detector(
        train,
        workdir / f"{name}-{k}-{seed}",
        normal_class=k,
        steps=args.steps,
        seed=seed,
        log=print,
    )
    fit_cpu = time.process_time() - t0
    t0 = time.process_time()
    diff_scores = det.scores(test.series, prepared=True).numpy()
    score_cpu = time.process_time() - t0
    flagged = diff_scores > det.threshold
    x_test = test.series.flatten(1).numpy()
    scores = {"difforge": diff_scores} | baselines(fit_part.series.flatten(1).numpy(), x_test, seed)
    scores |= {f"{m}_all": s for m, s in baselines(all_normals, x_test, seed).items()}
    row = {
        "set": name,
        "seed": seed,
        "length": length,
        "normal_class": test.class_names[k],
        "n_fit": len(fit_part),
        "n_val": det.info["val_size"],
        "n_test": len(test),
        "n_test_anomalies": int(is_anomaly.sum()),
        "roc_auc": {m: roc_auc(s, is_anomaly) for m, s in scores.items()},
        "pr_auc": {m: average_precision(s, is_anomaly) for m, s in scores.items()},
        "difforge_threshold": {
            "quantile": det.quantile,
            "test_fpr": float(flagged[~is_anomaly].mean()),
            "test_tpr": float(flagged[is_anomaly].mean()),
        },
        "difforge_cpu_s": {"fit": round(fit_cpu, 1), "score_test": round(score_cpu, 1)},
        "difforge_final_loss": det.info["final_loss"],
    }
    print(name, k, seed, {m: round(v, 3) for m, v in row["roc_auc"].items()}, flush=True)
    return row


def summarise(rows: list[dict]) -> dict:
    """Per set: the mean over normal classes and seeds of each method's ROC-AUC and PR-AUC."""
    sets: dict[str, dict] = {}
    for r in rows:
        s = sets.setdefault(r["set"], {"roc_auc": {}, "pr_auc": {}, "runs": 0})
        s["runs"] += 1
        for metric in ("roc_auc", "pr_auc"):
            for m, v in r[metric].items():
                s[metric][m] = s[metric].get(m, 0.0) + v
    for s in sets.values():
        for metric in ("roc_auc", "pr_auc"):
            s[metric] = {m: v / s["runs"] for m, v in s[metric].items()}
        base = {m: v for m, v in s["roc_auc"].items() if m != "difforge"}
        s["best_baseline"] = max(base, key=base.get)
        s["difforge_beats_best_baseline"] = s["roc_auc"]["difforge"] > base[s["best_baseline"]]
    return sets


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", default=DEFAULT_SETS, help="NAME:LENGTH,... (UCR sets in sktime)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", default="0,1", help="comma-separated seeds, one run each")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="GunPoint, 60 steps: a pipeline check")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sets, args.steps, args.seeds = "GunPoint:128", 60, "0"
    seeds = [int(s) for s in args.seeds.split(",")]
    workdir = Path(tempfile.mkdtemp(prefix="difforge-anomaly-"))
    rows = []
    try:
        for item in args.sets.split(","):
            name, length = item.split(":")
            n_classes = load_ucr(name, "test", length=int(length)).num_classes
            for seed in seeds:
                rows += [
                    run_class(name, int(length), k, seed, args, workdir) for k in range(n_classes)
                ]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    sets = summarise(rows)
    parts = []
    for name, s in sets.items():
        auc = s["roc_auc"]
        best = s["best_baseline"]
        parts.append(
            f"{name} ({s['runs']} runs = classes x seeds): ROC-AUC difforge {auc['difforge']:.3f} vs "
            f"best baseline {best} {auc[best]:.3f} ({'beats' if s['difforge_beats_best_baseline'] else 'does NOT beat'}); "
            f"PR-AUC {s['pr_auc']['difforge']:.3f} vs {s['pr_auc'][best]:.3f}"
        )
    summary = f"steps {args.steps}, seeds {args.seeds}; " + "; ".join(parts)
    if not args.quick:  # a pipeline check leaves no result behind
        payload = {"args": vars(args), "per_set": sets, "per_class": rows}
        print(write_result("anomaly", payload, summary))
    print(summary)


if __name__ == "__main__":
    main()
