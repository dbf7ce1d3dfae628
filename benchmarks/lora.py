"""A LoRA specialisation of the shipped MNIST model: thick strokes for classes 0-4 only.

    python -m benchmarks.lora [--model models/mnist-cond] [--steps 300] [--n 100] [--rank 4]
        [--threads 1] [--quick]

Trains an adapter (difforge.training.lora, peft) on the thickest 20% (by ink: the fraction of
pixels above mid grey) of each of the MNIST train classes 0-4, then samples n images per class
group (0-4: adapted, 5-9: unrelated) from the base and from the base + adapter (scale 1; merged
checked against it on 20 images), with the same seeds and the model's sampling defaults, and reports the mean ink (the
attribute) and the shipped classifier's label accuracy per group, beside the ink of the real
training subset and of all MNIST train digits of those classes.

Writes results/lora.json, the adapter under results/lora_adapter/ (not committed: rerun) and a
RESULTS.md row. `--quick`: 5 steps and n = 10, to check the plumbing.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, write_result
from difforge.data.mnist import load_mnist
from difforge.evaluation import load_feature_extractor
from difforge.evaluation.records import describe_model
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import load
from difforge.pipeline.adapters import apply_adapter, load_adapter
from difforge.training.lora import LoraTrainConfig, ink, select, train_lora

ROOT = Path(__file__).resolve().parent.parent
GROUPS = {"adapted 0-4": (0, 1, 2, 3, 4), "unrelated 5-9": (5, 6, 7, 8, 9)}


def measure(model, extractor, n: int, steps: int | None) -> dict[str, dict]:
    """Per class group: mean ink and label accuracy of n samples (fixed seeds)."""
    out = {}
    for name, classes in GROUPS.items():
        labels = [classes[i % len(classes)] for i in range(n)]
        images = []
        for i in range(0, n, 50):
            s = model.sample(labels=labels[i : i + 50], seed=30_000 + i, steps=steps)
            images.append(s.images)
        x = torch.cat(images)
        pred = extractor.logits(x.float() / 127.5 - 1).argmax(1)
        out[name] = {
            "ink": ink(x).mean().item(),
            "label_accuracy": (pred == torch.tensor(labels)).float().mean().item(),
            "n": n,
        }
    return out


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mnist-cond"))
    ap.add_argument("--steps", type=int, default=None, help="training steps [300; quick 5]")
    ap.add_argument("--n", type=int, default=None, help="samples per class group [100]")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--targets", default="qkv,proj,conv2", help="module name suffixes")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--sample-steps", type=int, default=None, help="[the model's]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    with compute_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    steps, n = args.steps or (5 if args.quick else 300), args.n or (10 if args.quick else 100)
    config = LoraTrainConfig(
        name="thick-0-4", rank=args.rank, alpha=float(args.rank), classes=GROUPS["adapted 0-4"],
        target_modules=tuple(args.targets.split(",")),
        stroke="thick", stroke_fraction=0.2, steps=steps, batch_size=args.batch_size, lr=args.lr,
    )  # fmt: skip
    folder = RESULTS_DIR / ("lora_adapter_quick" if args.quick else "lora_adapter")
    result = train_lora(args.model, config, folder)
    print(
        f"trained {result.trained_parameters:,} of {result.base_parameters:,} parameters "
        f"({100 * result.trained_fraction:.2f}%) on {result.images} images in "
        f"{result.seconds:.0f}s, final loss {result.final_loss:.4f}",
        file=sys.stderr,
    )
    train = load_mnist("train")
    subset = select(train, config)
    base0 = select(train, config.model_copy(update={"stroke": "any"}))
    base, adapter, extractor = load(args.model), load_adapter(folder), load_feature_extractor()
    rows = {}
    applied = apply_adapter(base, adapter, scale=1.0)
    for name, model in (("base", base), ("adapter", applied)):
        t = time.perf_counter()
        rows[name] = measure(model, extractor, n, args.sample_steps)
        print(f"{name}: {rows[name]} [{time.perf_counter() - t:.0f}s]", file=sys.stderr)
    merged = apply_adapter(base, adapter, scale=1.0, merge=True)
    kw = {"labels": list(range(10)) * 2, "seed": 30_000, "steps": args.sample_steps}
    merge_diff = (merged.sample(**kw).images.int() - applied.sample(**kw).images.int()).abs()
    a, b = rows["adapter"], rows["base"]
    summary = (
        ("QUICK (plumbing only): " if args.quick else "")
        + f"{base.name} + LoRA r={args.rank} on {args.targets}, "
        + f"{result.trained_parameters:,} params ({100 * result.trained_fraction:.2f}% of base), "
        + f"{steps} steps x {args.batch_size} on the thickest 20% of classes 0-4 "
        + f"({result.images} images, ink {ink(subset.images).mean():.3f} vs "
        + f"{ink(base0.images).mean():.3f} for all 0-4); n={n}/group: ink 0-4 "
        + f"{b['adapted 0-4']['ink']:.3f} -> {a['adapted 0-4']['ink']:.3f}, 5-9 "
        + f"{b['unrelated 5-9']['ink']:.3f} -> {a['unrelated 5-9']['ink']:.3f}; label acc 0-4 "
        + f"{b['adapted 0-4']['label_accuracy']:.3f} -> {a['adapted 0-4']['label_accuracy']:.3f}, "
        + f"5-9 {b['unrelated 5-9']['label_accuracy']:.3f} -> "
        + f"{a['unrelated 5-9']['label_accuracy']:.3f}; merged vs applied: max "
        + f"{merge_diff.max().item()} uint8 levels over 20 images"
    )
    payload = {
        "model": describe_model(base), "config": config.model_dump(mode="json"),
        "adapter_sha256": adapter.sha256, "trained_parameters": result.trained_parameters,
        "base_parameters": result.base_parameters, "train_seconds": round(result.seconds, 1),
        "final_loss": result.final_loss, "subset_images": result.images,
        "ink_train_subset": ink(subset.images).mean().item(),
        "ink_train_classes_all": ink(base0.images).mean().item(),
        "samples": rows, "merged_vs_applied_max_uint8_diff": merge_diff.max().item(),
        "merged_vs_applied_pixels_differing": int((merge_diff > 0).sum()), "sample_steps": args.sample_steps or base.sampling.steps,
        "extractor": {"name": extractor.name, "sha256": extractor.sha256},
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = write_result("lora_quick" if args.quick else "lora", payload, summary)
    print(summary)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
