"""The shipped output filters on real and generated MNIST: how often each passes, flags, and costs.

- quality (P(requested class) under the shipped feature net, threshold 0.5): pass rate of real
  test digits asked for their own label, and of the same digits asked for another label (a false
  pass), and of `--n-gen` images from `--model` asked for their labels;
- the mark detector (difforge.pipeline.filters.detect_mark, default options): false positives on
  real and generated digits, detections on the real digits with a mark stamped in (a solid corner
  patch, a dashed text-like bar along a border, a 9x9 label over the digit, a 3x5 glyph in the
  border), each at a random place (seeded);
- the default policy (mark or quality below 0.5 -> review): pass rates, and its cost in ms per
  image in batches of 16 on one thread.

    python -m benchmarks.filters --n-real 10000 --n-gen 200
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.common import write_result
from difforge.data.mnist import load_mnist
from difforge.evaluation.features import load_feature_extractor
from difforge.evaluation.filtering import evaluation_stage, filter_images
from difforge.pipeline import load
from difforge.pipeline.filters import Conditioning, detect_mark


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--n-real", type=int, default=10_000)
    ap.add_argument("--n-gen", type=int, default=200)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="filters")
    return ap.parse_args()


def stamp(images: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """Each image with one mark of `kind` at a random place (uint8 (N, 1, 28, 28))."""
    out = images.clone()
    for i in range(out.shape[0]):
        r = torch.randint(0, 4, (3,), generator=gen).tolist()
        if kind == "corner":  # a 4x6 patch in one of the four corners
            y, x = (0, 24)[r[0] % 2], (0, 22)[r[1] % 2]
            out[i, :, y : y + 4, x : x + 6] = 255
        elif kind == "bar":  # 8 dashes along one border, two pixels deep, like small text
            offset = 4 + r[1]
            sl = slice(offset, offset + 16, 2)
            if r[0] == 0:
                out[i, :, 26:28, sl] = 230
            elif r[0] == 1:
                out[i, :, 0:2, sl] = 230
            elif r[0] == 2:
                out[i, :, sl, 0:2] = 230
            else:
                out[i, :, sl, 26:28] = 230
        elif kind == "label":  # a 9x9 solid label pasted over the middle
            y, x = 8 + r[0], 8 + r[1]
            out[i, :, y : y + 9, x : x + 9] = 255
        elif kind == "glyph":  # a 3x5 letter-like glyph (an "E") in the border band
            glyph = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 1, 1]]) * 240
            y, x = 22 + r[0] % 2, 2 + 6 * r[1]
            region = out[i, 0, y : y + 5, x : x + 3]
            out[i, 0, y : y + 5, x : x + 3] = torch.maximum(region, glyph.to(torch.uint8))
    return out


def rate(flags) -> float:
    return sum(bool(f) for f in flags) / len(flags)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    net = load_feature_extractor()
    quality = evaluation_stage(["quality"], net)
    policy = evaluation_stage(["policy"], net)
    test = load_mnist("test")
    images, labels = test.images[: args.n_real], test.labels[: args.n_real].tolist()
    gen = torch.Generator().manual_seed(0)
    wrong = [(y + int(torch.randint(1, 10, (1,), generator=gen))) % 10 for y in labels]

    real = {
        "n": len(labels),
        "quality_pass_own_label": filter_images(quality, images, labels)["filter_pass_rate"],
        "quality_pass_other_label": filter_images(quality, images, wrong)["filter_pass_rate"],
        "policy_pass": filter_images(policy, images, labels)["filter_pass_rate"],
        "mark_false_positive": rate(detect_mark(images)),
    }
    stamped = {
        k: rate(detect_mark(stamp(images, k, gen))) for k in ("corner", "bar", "label", "glyph")
    }

    model = load(args.model)
    asked = [i % 10 for i in range(args.n_gen)]
    t0 = time.perf_counter()
    samples = model.sample(
        labels=asked, seed=0, steps=args.steps, guidance=args.guidance, sampler="dpmpp_2m"
    )
    sample_s = time.perf_counter() - t0
    generated = {
        "n": args.n_gen,
        "sampler": f"dpmpp_2m {args.steps} steps, guidance {args.guidance}",
        "quality_pass": filter_images(quality, samples.images, asked)["filter_pass_rate"],
        "policy_pass": filter_images(policy, samples.images, asked)["filter_pass_rate"],
        "mark_false_positive": rate(detect_mark(samples.images)),
        "sampling_ms_per_image": 1000 * sample_s / args.n_gen,
    }

    batch = images[:16]
    plan = Conditioning({"labels": labels[:16]})
    policy(batch, plan)  # warm
    reps = 50
    t0 = time.perf_counter()
    for _ in range(reps):
        policy(batch, plan)
    cost_ms = 1000 * (time.perf_counter() - t0) / (reps * 16)

    payload = {
        "args": vars(args),
        "real": real,
        "stamped_detected": stamped,
        "generated": generated,
        "policy_ms_per_image_b16": cost_ms,
        "classifier": {"name": net.name, "sha256": net.sha256},
    }
    summary = (
        f"real MNIST test n={real['n']}: quality pass {real['quality_pass_own_label']:.4f} own "
        f"label vs {real['quality_pass_other_label']:.4f} other label; mark false positives "
        f"{real['mark_false_positive']:.4f}; default policy pass {real['policy_pass']:.4f}; "
        "stamped marks detected: "
        + ", ".join(f"{k} {v:.4f}" for k, v in stamped.items())
        + f"; {args.model} n={args.n_gen} ({generated['sampler']}): quality pass "
        f"{generated['quality_pass']:.3f}, mark false positives "
        f"{generated['mark_false_positive']:.3f}, policy pass {generated['policy_pass']:.3f}; "
        f"policy cost {cost_ms:.2f} ms/image (batch 16, {args.threads} thread) vs sampling "
        f"{generated['sampling_ms_per_image']:.0f} ms/image"
    )
    write_result(args.name, payload, summary)
    print(summary)


if __name__ == "__main__":
    main()
