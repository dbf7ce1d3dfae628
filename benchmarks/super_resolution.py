"""Cascaded super-resolution on MNIST: the 14x14 -> 28x28 upsampler against bicubic upsampling,
and the cascade (14x14 base -> upsampler) against the single-stage 28x28 model at equal cost.

    python -m benchmarks.super_resolution --cascade models/mnist-cascade [--single models/mnist-cond]
        [--n-psnr 500] [--n-fid 500] [--ref-n 10000] [--levels 0,0.2] [--with-default]
        [--threads 1] [--quick]

PSNR: the first n-psnr MNIST test digits, downsampled to 14x14 by `difforge.data.downsample`
(2x2 block mean, what the upsampler and the base were trained on), brought back to 28x28 by
nearest, by bicubic (torch.nn.functional.interpolate, align_corners=False) and by the upsampler
(its recorded sampler, steps and augmentation level; seeds 0..n-1), against the real 28x28 digit:
mean PSNR over images (uint8, peak 255), the PSNR of each output downsampled again against its
14x14 input (does it stay consistent with what it was given), and the shipped digit classifier's
accuracy on each; the upsampler also at the extra augmentation `--levels`.

FID (difforge's MNIST feature space, models/mnist-features): n-fid samples, classes cycling,
seeds 0..n-1, of the cascade at its defaults, of the same base samples upsampled bicubic instead, and of the
single-stage model with the step count whose cost is nearest the cascade's (`--with-default`:
also at its default steps); against ref-n MNIST
training digits, beside the real-data floor (n-fid test digits against the same reference). Cost
per image = sum over stages of NFE x FLOPs per forward (x2 where classifier-free guidance runs the
unconditional branch in the same forward); FLOPs by difforge.nets.flops_per_forward.

Writes results/super_resolution.json, results/super_resolution.png and a RESULTS.md row.
`--quick`: n = 150 / 150 and a 2000-image reference, to check the plumbing.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch.nn import functional as F

from benchmarks.common import RESULTS_DIR, write_result
from difforge.data import downsample
from difforge.data.mnist import load_mnist
from difforge.evaluation import load_feature_extractor
from difforge.evaluation.metrics import fid
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import load, network_cost, resolve
from difforge.pipeline.cascade import Cascade
from difforge.samplers import expected_nfe

CHUNK = 50  # images per sampler call


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of uint8 (N, C, H, W) images, peak 255 (inf when equal: capped 99)."""
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return (10 * torch.log10(255.0**2 / mse.clamp(min=1e-10))).clamp(max=99.0)


def bicubic(low: torch.Tensor, size: int, mode: str = "bicubic") -> torch.Tensor:
    x = low.float()
    kwargs = {"align_corners": False} if mode == "bicubic" else {}
    up = F.interpolate(x, size=(size, size), mode=mode, **kwargs)
    return up.round().clamp(0, 255).to(torch.uint8)


def classify(extractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor.logits(c.float() / 127.5 - 1).argmax(1) for c in images.split(500)])


def features(extractor, images: torch.Tensor) -> torch.Tensor:
    return torch.cat([extractor.features(c.float() / 127.5 - 1) for c in images.split(500)])


def stage_cost(model, steps: int, sampler: str, guided: bool) -> dict:
    """NFE and FLOPs per image of sampling one stage."""
    _, flops = network_cost(model.net, model.latent_shape, model.spec)
    nfe = expected_nfe(sampler, steps)
    return {"nfe": nfe, "flops_per_forward": flops, "flops": nfe * flops * (2 if guided else 1)}


def cascade_cost(cascade: Cascade) -> dict:
    b, s = cascade.base, cascade.summary()["upsampler_sampling"]
    base = stage_cost(b, b.sampling.steps, b.sampling.sampler, b.sampling.guidance != 1.0)
    up = stage_cost(cascade.upsampler, s["steps"], s["sampler"], False)
    return {"base": base, "upsampler": up, "flops": base["flops"] + up["flops"]}


def draw(model, n: int, **fields) -> tuple[torch.Tensor, float]:
    """n samples (classes cycling, seeds 0..n-1) in CHUNK-image calls; (uint8, seconds)."""
    out, t0 = [], time.process_time()
    for i in range(0, n, CHUNK):
        m = min(CHUNK, n - i)
        labels = [(i + j) % 10 for j in range(m)]
        plan = resolve(model, {"labels": labels, "seeds": list(range(i, i + m)), **fields})
        out.append(model.generate(plan).images)
        print(f"  {model.name}: {i + m}/{n}", file=sys.stderr, flush=True)
    return torch.cat(out), time.process_time() - t0


def upscale_all(upsampler, low: torch.Tensor, level: float | None) -> torch.Tensor:
    """Upscaled uint8 images, CHUNK per call, seeds 0..n-1."""
    out = []
    for i in range(0, len(low), CHUNK):
        chunk = low[i : i + CHUNK]
        out.append(upsampler.upscale(chunk, seeds=range(i, i + len(chunk)), level=level).images)
    return torch.cat(out)


def draw_cascade(cascade: Cascade, n: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """The cascade's n samples and its base's (the same calls `Cascade.sample_latents` makes,
    keeping the 14x14 images): (uint8 28x28, uint8 14x14, CPU seconds)."""
    highs, lows, t0 = [], [], time.process_time()
    for i in range(0, n, CHUNK):
        m = min(CHUNK, n - i)
        labels = [(i + j) % 10 for j in range(m)]
        plan = resolve(cascade, {"labels": labels, "seeds": list(range(i, i + m))})
        x, _ = cascade.base.sample_latents(plan.rows, plan)
        low = cascade.base.decode(x)  # uint8 (m, 1, 14, 14)
        up = cascade.upsampler_plan(low, cascade.upsampler_seeds(plan.seeds))
        y, _ = cascade.upsampler.sample_latents(up.rows, up)
        highs.append(cascade.upsampler.decode(y))
        lows.append(low)
        print(f"  {cascade.name}: {i + m}/{n}", file=sys.stderr, flush=True)
    return torch.cat(highs), torch.cat(lows), time.process_time() - t0


def run_psnr(cascade: Cascade, extractor, n: int, levels: list[float]) -> dict:
    """PSNR against the real digit, PSNR of the output downsampled again against the input
    (consistency with the low-res image), and the classifier's accuracy; per method."""
    test = load_mnist("test")
    real, labels = test.images[:n], test.labels[:n]
    low = downsample(real, 2)
    t0 = time.process_time()
    outputs = {"upsampler": upscale_all(cascade.upsampler, low, None)}
    sr_seconds = time.process_time() - t0
    outputs |= {"nearest": bicubic(low, 28, "nearest"), "bicubic": bicubic(low, 28)}
    for level in levels:
        outputs[f"upsampler_level_{level:g}"] = upscale_all(cascade.upsampler, low, level)
    out = {"n": n, "upsampler_cpu_s_per_image": sr_seconds / n}
    out["level"] = cascade.summary()["upsampler_sampling"]["level"]
    out["accuracy_real"] = (classify(extractor, real) == labels).float().mean().item()
    for name, images in outputs.items():
        p = psnr(images, real)
        out[name] = {
            "psnr_db": p.mean().item(),
            "psnr_sem": (p.std() / math.sqrt(n)).item(),
            "low_res_psnr_db": psnr(downsample(images, 2), low).mean().item(),
            "accuracy": (classify(extractor, images) == labels).float().mean().item(),
        }
    out["_images"] = (real[:16], outputs)
    return out


def run_fid(cascade: Cascade, single, extractor, n: int, ref_n: int, default: bool) -> dict:
    ref = features(extractor, load_mnist("train").images[:ref_n])
    floor = fid(features(extractor, load_mnist("test").images[-n:]), ref)
    cost = cascade_cost(cascade)
    s = single.sampling
    guided = s.guidance != 1.0
    per_step = stage_cost(single, 1, s.sampler, guided)["flops"]  # dpmpp_2m: 1 NFE per step
    matched = max(1, round(cost["flops"] / per_step))
    rows = {"real_floor": {"fid": floor}}
    high, low, seconds = draw_cascade(cascade, n)
    rows["cascade"] = {
        "fid": fid(features(extractor, high), ref),
        "gflops_per_image": cost["flops"] / 1e9,
        "cpu_s_per_image": seconds / n,
    }
    rows["base_bicubic"] = {  # the same base samples, bicubic instead of the upsampler
        "fid": fid(features(extractor, bicubic(low, 28)), ref),
        "gflops_per_image": cost["base"]["flops"] / 1e9,
    }
    samples = {"cascade": high[:16], "base_bicubic": bicubic(low[:16], 28)}
    runs = [(f"single_{matched}_steps", single, {"steps": matched}, None)]
    if default and matched != s.steps:
        runs.append((f"single_{s.steps}_steps", single, {}, None))
    for name, model, fields, flops in runs:
        images, seconds = draw(model, n, **fields)
        steps = fields.get("steps", model.sampling.steps)
        if flops is None:
            flops = stage_cost(model, steps, model.sampling.sampler, guided)["flops"]
        rows[name] = {
            "fid": fid(features(extractor, images), ref),
            "gflops_per_image": flops / 1e9,
            "cpu_s_per_image": seconds / n,
            "steps": steps,
        }
        samples[name] = images[:16]
    return {"n": n, "ref_n": ref_n, "cost": cost, "rows": rows, "_images": samples}


def save_png(psnr_part: dict, fid_part: dict, path: Path) -> None:
    from difforge.common.png import save_grid_png

    real, outs = psnr_part["_images"]
    rows = [real, *[outs[k][:16] for k in ("nearest", "bicubic", "upsampler")]]  # 16 each
    rows += list(fid_part["_images"].values())
    save_grid_png(path, torch.cat(rows), nrow=16)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--cascade", default="models/mnist-cascade")
    ap.add_argument("--single", default="models/mnist-cond")
    ap.add_argument("--n-psnr", type=int, default=500)
    ap.add_argument("--n-fid", type=int, default=500)
    ap.add_argument("--ref-n", type=int, default=10000)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--levels", default="0,0.2", help="extra augmentation levels for PSNR")
    ap.add_argument("--with-default", action="store_true", help="also the single model's steps")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.n_psnr, args.n_fid, args.ref_n = 150, 150, 2000
    cascade, single = load(args.cascade), load(args.single)
    if not isinstance(cascade, Cascade):
        ap.error(f"--cascade {args.cascade} is not a cascade folder")
    extractor = load_feature_extractor()
    with compute_threads(args.threads):
        levels = [float(v) for v in args.levels.split(",") if v.strip()]
        p = run_psnr(cascade, extractor, args.n_psnr, levels)
        f = run_fid(cascade, single, extractor, args.n_fid, args.ref_n, args.with_default)
    RESULTS_DIR.mkdir(exist_ok=True)
    save_png(p, f, RESULTS_DIR / "super_resolution.png")
    p.pop("_images"), f.pop("_images")
    rows = f["rows"]
    fids = ", ".join(
        f"{k} {v['fid']:.2f}"
        + (f" ({v['gflops_per_image']:.2f} GFLOP/img)" if "gflops_per_image" in v else "")
        for k, v in rows.items()
    )
    summary = (
        f"{args.cascade} (base {cascade.base.sha256[:12]}, "
        f"upsampler {cascade.upsampler.sha256[:12]}) "
        f"vs {args.single}; PSNR 14->28 on {p['n']} test digits: upsampler (level {p['level']:g}) "
        f"{p['upsampler']['psnr_db']:.2f} dB (sem {p['upsampler']['psnr_sem']:.2f}) vs bicubic "
        f"{p['bicubic']['psnr_db']:.2f} vs nearest {p['nearest']['psnr_db']:.2f}"
        + "".join(f", level {lv:g} {p[f'upsampler_level_{lv:g}']['psnr_db']:.2f}" for lv in levels)
        + f"; low-res consistency (PSNR of the output downsampled vs the input) upsampler "
        f"{p['upsampler']['low_res_psnr_db']:.2f} / bicubic {p['bicubic']['low_res_psnr_db']:.2f}"
        f"; digit accuracy "
        f"{p['upsampler']['accuracy']:.3f} / {p['bicubic']['accuracy']:.3f} / "
        f"{p['nearest']['accuracy']:.3f} (real {p['accuracy_real']:.3f}); FID n={f['n']} vs "
        f"{f['ref_n']} train digits: {fids}"
    )
    payload = {"cascade": args.cascade, "single": args.single, "psnr": p, "fid": f}
    print(summary)
    write_result("super_resolution", payload, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
