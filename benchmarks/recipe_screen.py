"""Screen a training recipe on MNIST: train to each step budget, score label accuracy and FID.

A cheaper sibling of `benchmarks.time_to_quality` for comparing recipes on this shared CPU: no
diffusers side, no throughput bursts, no real-data floor. The recipe is `--config` with
`--set` overrides (a JSON object merged into it), trained from scratch to each of `--steps`
(resuming in between) and sampled at mnist-cond's defaults (dpmpp_2m, 20 steps, guidance 3, seed
0) on n class-balanced labels. Wall-clock of training and the 1-minute load are reported beside.

    python -m benchmarks.recipe_screen --name base --steps 250,600 --n 500
    python -m benchmarks.recipe_screen --name fast --set '{"optim": {"lr": 0.002}}'
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import write_result
from difforge.evaluation import load_feature_extractor, mnist_reference
from difforge.evaluation.evaluate import evaluate_images
from difforge.training import parse_config, train

ROOT = Path(__file__).resolve().parent.parent


def merged(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`base` with `overrides` merged in, nested objects key by key (neither is changed)."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--name", required=True, help="name of the recipe in the report")
    ap.add_argument("--config", default="configs/mnist.json")
    ap.add_argument("--set", default="{}", help="JSON object merged into the config")
    ap.add_argument("--steps", default="250,600", help="comma-separated step budgets")
    ap.add_argument("--n", type=int, default=500)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    overrides = json.loads(args.set)
    data = merged(json.loads((ROOT / args.config).read_text()), overrides | {"sample_every": 0})
    cfg = parse_config(data, args.config)
    steps = [int(s) for s in args.steps.split(",")]
    labels = [i % 10 for i in range(args.n)]
    import difforge

    extractor = load_feature_extractor()
    reference = mnist_reference("test", extractor)
    points, seconds = [], 0.0
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        for i, budget in enumerate(steps):
            res = train(cfg, run_dir, resume=i > 0, until_step=budget, progress=False)
            seconds += res.seconds
            model_dir = Path(tmp) / f"model-{budget}"
            shutil.copytree(res.model_dir, model_dir)
            model = difforge.load(model_dir)
            imgs = model.sample(labels=labels, sampler="dpmpp_2m", steps=20, guidance=3.0, seed=0)
            m = evaluate_images(imgs.images, torch.tensor(labels), extractor, reference)["metrics"]
            point = {
                "steps": res.step,
                "images": res.step * cfg.batch_size,
                "train_minutes": seconds / 60,
                "load_1min": os.getloadavg()[0],
                "label_accuracy": m["label_accuracy"],
                "fid": m["fid"],
            }
            points.append(point)
            print(json.dumps(point), flush=True)
    summary = (
        f"recipe {args.name} ({args.config} + {json.dumps(overrides)}), n={args.n}: "
        + "; ".join(
            f"{p['steps']} steps ({p['images']:,} images)/{p['train_minutes']:.1f} min at load "
            f"{p['load_1min']:.0f}: acc {100 * p['label_accuracy']:.1f}%, FID {p['fid']:.1f}"
            for p in points
        )
    )
    payload = {"name": args.name, "config": args.config, "overrides": overrides, "n": args.n}
    write_result(f"recipe_screen_{args.name}", payload | {"points": points}, summary)
    print(summary)


if __name__ == "__main__":
    main()
