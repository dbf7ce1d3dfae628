"""img2img and inpainting on the shipped MNIST model, judged by the shipped MNIST classifier.

    python -m benchmarks.editing [--model models/mnist-cond] [--n 200] [--strengths 0.2,...]
        [--guidance 3] [--resample 5,2] [--threads 1] [--quick]

img2img (SDEdit): n MNIST test digits of class a, each edited towards a class b != a (drawn per
image, seeded) with classifier-free guidance, at every strength: the fraction the classifier
(models/mnist-features) calls b, the fraction still a, and the mean absolute pixel distance from
the input (uint8 / 255). The same seeds at every strength, so the points are paired.

Inpainting (RePaint, training-free): n other test digits with the lower or the left half masked,
completed unconditionally (null label, guidance 1: the model must read the class off the visible
half), plain and with RePaint resampling: the classifier's accuracy on the completed digit against
the true label (beside its accuracy on the real digit and on the digit with the hole blank),
seam visibility (mean squared pixel step across the mask border, over the real digits' same
step: 1 = as smooth as real digits; a pasted half of another digit of the same class is the
control), and the number of images whose known region is unchanged to the byte.

A mask-conditioned inpainting model (`difforge train-inpaint`, e.g. models/mnist-inpaint) runs
through the same requests (`--model models/mnist-inpaint --only inpaint`): its spec's
masked_image key turns the request's init image and mask into extra input channels, and the
known region is re-imposed as for RePaint, so the rows are comparable at the same n and seeds.

Writes results/editing.json (editing_<model>.json for a model other than mnist-cond),
results/editing.png and a RESULTS.md row. `--quick`: n = 20 and 5 steps, to check the plumbing.
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
from difforge.pipeline import load, resolve

ROOT = Path(__file__).resolve().parent.parent
CHUNK = 50  # images per sampler call


def classify(extractor, images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 1, 28, 28) -> predicted class (N,)."""
    return torch.cat([extractor.logits(c.float() / 127.5 - 1).argmax(1) for c in images.split(500)])


def edit(model, init, labels, seeds, steps, guidance, **fields) -> torch.Tensor:
    """Edited uint8 images, CHUNK per call (one resolver request each)."""
    out = []
    for i in range(0, len(init), CHUNK):
        sl = slice(i, i + CHUNK)
        request = {
            "init_image": list(init[sl]),
            "labels": labels[sl],
            "seeds": seeds[sl],
            "steps": steps,
            "guidance": guidance,
            **fields,  # one value for all images (strength, mask, resample)
        }
        out.append(model.generate(resolve(model, request)).images)
    return torch.cat(out)


def img2img(model, extractor, data, n, strengths, steps, guidance) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    idx = torch.randperm(len(data), generator=g)[:n]
    init, a = data.images[idx], data.labels[idx]
    b = (a + torch.randint(1, 10, (n,), generator=g)) % 10  # a class != a, uniform
    seeds = list(range(10_000, 10_000 + n))
    points = []
    for s in strengths:
        t0 = time.perf_counter()
        out = edit(model, init, b.tolist(), seeds, steps, guidance, strength=s)
        pred = classify(extractor, out)
        dist = (out.float() - init.float()).abs().mean((1, 2, 3)) / 255  # (n,)
        points.append({
            "strength": s,
            "steps_run": max(1, int(steps * s)),
            "fraction_b": (pred == b).float().mean().item(),
            "fraction_a": (pred == a).float().mean().item(),
            "pixel_l1_mean": dist.mean().item(),
            "pixel_l1_std": dist.std().item(),
            "seconds": round(time.perf_counter() - t0, 1),
        })  # fmt: skip
        p = points[-1]
        print(
            f"img2img strength {s:g}: b {p['fraction_b']:.3f}, a {p['fraction_a']:.3f}, "
            f"L1 {p['pixel_l1_mean']:.3f} [{p['seconds']:.0f}s]",
            file=sys.stderr,
        )
    return points


def half_mask(side: str) -> torch.Tensor:
    """uint8 (1, 28, 28): 255 = generate the lower or the left half."""
    m = torch.zeros(1, 28, 28, dtype=torch.uint8)
    if side == "lower":
        m[:, 14:] = 255
    else:
        m[:, :, :14] = 255
    return m


def seam_energy(images: torch.Tensor, side: str) -> torch.Tensor:
    """Per image: mean squared step (in [0, 1] units) across the border rows/columns 13 | 14."""
    x = images.float() / 255
    step = x[..., 14, :] - x[..., 13, :] if side == "lower" else x[..., 14] - x[..., 13]
    return step.pow(2).mean((1, 2))  # (N,)


def pasted_control(data, idx, side: str, g) -> torch.Tensor:
    """Each digit's masked half replaced by that half of another test digit of its class."""
    out = data.images[idx].clone()
    keep = half_mask(side) == 0  # (1, 28, 28)
    for i, j in enumerate(idx.tolist()):
        same = (data.labels == data.labels[j]).nonzero()[:, 0]
        other = same[torch.randint(len(same), (1,), generator=g)].item()
        out[i] = torch.where(keep, out[i], data.images[other])
    return out


def inpaint(model, extractor, data, n, steps, resample, sampler=None, true_labels=False):
    g = torch.Generator().manual_seed(2)
    idx = torch.randperm(len(data), generator=g)[:n]
    real, y = data.images[idx], data.labels[idx]
    seeds = list(range(20_000, 20_000 + n))
    points = []
    for side in ("lower", "left"):
        mask = half_mask(side)
        blank = torch.where(mask > 0, torch.zeros_like(real), real)
        real_seam = seam_energy(real, side).mean().item()
        control = seam_energy(pasted_control(data, idx, side, g), side).mean().item()
        for jumps in (None, resample):
            t0 = time.perf_counter()
            extra = {} if jumps is None else {"resample": jumps}
            extra |= {} if sampler is None else {"sampler": sampler}
            labels = y.tolist() if true_labels else [None] * n  # true: the upper bound
            out = edit(model, real, labels, seeds, steps, 1.0, mask=mask, **extra)
            known = (mask == 0).expand_as(real)
            kept = sum(
                torch.equal(o[known[0]], r[known[0]]) for o, r in zip(out, real, strict=True)
            )
            seam = seam_energy(out, side).mean().item()
            points.append({
                "mask": side, "resample": None if jumps is None else list(jumps),
                "sampler": sampler or model.sampling.sampler,
                "conditioning": "true label" if true_labels else "none",
                "accuracy_completed": (classify(extractor, out) == y).float().mean().item(),
                "accuracy_real": (classify(extractor, real) == y).float().mean().item(),
                "accuracy_hole_blank": (classify(extractor, blank) == y).float().mean().item(),
                "seam_energy": seam, "seam_energy_real": real_seam,
                "seam_ratio": seam / real_seam, "seam_ratio_pasted_control": control / real_seam,
                "known_region_identical": int(kept), "n": n,
                "seconds": round(time.perf_counter() - t0, 1),
            })  # fmt: skip
            p = points[-1]
            print(
                f"inpaint {side} resample {jumps}: acc {p['accuracy_completed']:.3f} (real "
                f"{p['accuracy_real']:.3f}, blank {p['accuracy_hole_blank']:.3f}), seam ratio "
                f"{p['seam_ratio']:.2f} (pasted {p['seam_ratio_pasted_control']:.2f}), kept "
                f"{kept}/{n} [{p['seconds']:.0f}s]",
                file=sys.stderr,
            )
    return points


def plot(points: list[dict], title: str, path: Path) -> Path:
    """Fraction turned into b and pixel distance from the input, against strength."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    s = [p["strength"] for p in points]
    ax.plot(s, [p["fraction_b"] for p in points], "o-", color="tab:red", label="classified as b")
    ax.plot(s, [p["fraction_a"] for p in points], "s--", color="tab:gray", label="still a")
    ax.set_xlabel("strength (1 = from pure noise)")
    ax.set_ylabel("fraction of edited digits")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left")
    dist = ax.twinx()
    dist.plot(s, [p["pixel_l1_mean"] for p in points], "^:", color="tab:blue")
    dist.set_ylabel("mean |edited - input| (pixel / 255)", color="tab:blue")
    fig.suptitle(title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mnist-cond"))
    ap.add_argument("--n", type=int, default=None, help="digits per point [200; quick 20]")
    ap.add_argument("--strengths", default="0.2,0.4,0.5,0.6,0.8,1.0")
    ap.add_argument("--guidance", type=float, default=3.0, help="img2img guidance towards b")
    ap.add_argument("--steps", type=int, default=None, help="[the model's; quick 5]")
    ap.add_argument("--resample", default="5,2", help="RePaint JUMP_LENGTH,JUMP_N_SAMPLE")
    ap.add_argument("--inpaint-sampler", default=None, help="[the model's]")
    ap.add_argument("--true-labels", action="store_true", help="inpaint given the true label")
    ap.add_argument("--only", choices=("all", "img2img", "inpaint"), default="all")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    with compute_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    model, extractor, data = load(args.model), load_feature_extractor(), load_mnist("test")
    n = args.n or (20 if args.quick else 200)
    steps = args.steps or (5 if args.quick else model.sampling.steps)
    strengths = [float(v) for v in args.strengths.split(",")]
    resample = tuple(int(v) for v in args.resample.split(","))
    i2i, inp, png = [], [], None
    if args.only != "inpaint":
        i2i = img2img(model, extractor, data, n, strengths, steps, args.guidance)
    if args.only != "img2img":
        inp = inpaint(
            model, extractor, data, n, steps, resample, args.inpaint_sampler, args.true_labels
        )
    stem = "editing_quick" if args.quick else "editing"
    stem += "" if model.name == "mnist-cond" else f"_{model.name}"
    stem += "" if args.only == "all" else f"_{args.only}"
    stem += "" if args.inpaint_sampler is None else f"_{args.inpaint_sampler}"
    stem += "_true_labels" if args.true_labels else ""
    if i2i:
        title = f"img2img a -> b, {model.name}: {model.sampling.sampler} {steps} steps, w = {args.guidance:g}, n = {n}"
        png = plot(i2i, title, RESULTS_DIR / f"{stem}.png")
    curve = ", ".join(
        f"{p['strength']:g}: {p['fraction_b']:.2f}/{p['pixel_l1_mean']:.3f}" for p in i2i
    )
    fills = "; ".join(
        f"{p['mask']} {p['sampler']}{'+RePaint' + str(tuple(p['resample'])) if p['resample'] else ''}: acc "
        f"{p['accuracy_completed']:.3f} (real {p['accuracy_real']:.3f}, blank "
        f"{p['accuracy_hole_blank']:.3f}), seam {p['seam_ratio']:.2f}x real (pasted "
        f"{p['seam_ratio_pasted_control']:.2f}x), known region identical "
        f"{p['known_region_identical']}/{p['n']}"
        for p in inp
    )
    summary = (
        ("QUICK (plumbing only): " if args.quick else "")
        + f"{model.name}, {steps} steps, n={n}"
        + (
            f"; img2img ({model.sampling.sampler}) a->b, w={args.guidance:g}, strength: fraction b / L1 from input: {curve}"
            if i2i
            else ""
        )
        + (
            f"; inpainting ({'given the true label' if args.true_labels else 'unconditional'}): {fills}"
            if inp
            else ""
        )
    )
    payload = {
        "model": describe_model(model), "sampler": model.sampling.sampler, "steps": steps,
        "num_samples": n, "guidance_img2img": args.guidance,
        "extractor": {"name": extractor.name, "sha256": extractor.sha256},
        "data": {"name": data.name, "content_hash": data.content_hash},
        "img2img": i2i, "inpainting": inp, "plot": None if png is None else str(png.relative_to(ROOT)),
        "wall_time_s": round(time.perf_counter() - t0, 1),
    }  # fmt: skip
    out = write_result(stem, payload, summary)
    print(summary)
    print(f"wrote {out}" + ("" if png is None else f" and {png}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
