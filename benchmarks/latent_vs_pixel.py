"""Latent vs pixel diffusion on 64x64 MNIST scenes, side by side in one run.

For each model (trained for the same wall-clock budget by `difforge train`): sampling cost per
image at the model's sampler and `--steps` (FLOPs counted by torch's counter: denoiser forwards x
NFE x 2 under guidance, plus one VAE decode; wall-clock and process-CPU ms), training throughput
(images per second of training, from the model's provenance), FID in the per-quadrant MNIST
feature space against held-out test scenes, and per-slot digit accuracy (the MNIST classifier on
each quadrant of each sample: requested digits present and right, empty quadrants empty).

    python -m benchmarks.latent_vs_pixel --latent runs/scenes-latent/model \
        --pixel runs/scenes-pixel/model --n 200 --threads 1
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import difforge
from benchmarks.common import write_result
from difforge.data.scenes import EMPTY, load_scenes
from difforge.evaluation.features import load_feature_extractor
from difforge.evaluation.metrics import fid
from difforge.evaluation.scenes import predict_slots, quadrant_digits, slot_accuracy
from difforge.nets import flops_per_forward


def quadrant_features(extractor, images: torch.Tensor, batch: int = 100) -> np.ndarray:
    """(N, 1, 64, 64) -> (4N, 128): the MNIST features of every quadrant (empty ones included)."""
    out = [
        extractor.features(quadrant_digits(images[i : i + batch]))
        for i in range(0, len(images), batch)
    ]
    return torch.cat(out).double().numpy()


def cost_per_image(model, steps: int, guided: bool) -> dict[str, Any]:
    """FLOPs of one image: NFE denoiser forwards (x2 under CFG) + one decode."""
    x = torch.zeros(1, *model.latent_shape)
    forward = flops_per_forward(model.net, x, torch.zeros(1), model.spec.null_batch(1))
    decode = 0
    if model.vae is not None:
        z = torch.zeros(1, *model.vae_config.latent_shape)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model.vae.decode(z)
        decode = int(counter.get_total_flops())
    nfe = steps  # dpmpp_2m / euler: one denoiser evaluation per step
    total = nfe * forward * (2 if guided else 1) + decode
    return {"nfe": nfe, "forward_flops": forward, "decode_flops": decode, "flops_per_image": total}


def timed_sampling(
    model, slots: list, steps: int, seeds: list[int]
) -> tuple[torch.Tensor, float, float]:
    """Images, wall ms per image and process-CPU ms per image of one batched call."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = model.sample(cond={"slots": slots}, seeds=seeds, steps=steps)
    n = len(seeds)
    return (
        out.images,
        1000 * (time.perf_counter() - wall) / n,
        1000 * (time.process_time() - cpu) / n,
    )


def evaluate(path: str, args, test, extractor, real_q: np.ndarray) -> dict[str, Any]:
    model = difforge.load(path)
    requested = test.slots[: args.n]
    values = [[None if int(v) == EMPTY else int(v) for v in row] for row in requested]
    guided = model.sampling.guidance != 1.0
    model.sample(cond={"slots": values[:1]}, seeds=[0], steps=2)  # warm-up
    _, wall_ms, cpu_ms = timed_sampling(
        model, values[: args.timing_n], args.steps, list(range(args.timing_n))
    )
    images = []
    for i in range(0, args.n, args.batch):
        images.append(
            timed_sampling(
                model,
                values[i : i + args.batch],
                args.steps,
                list(range(i, min(i + args.batch, args.n))),
            )[0]
        )
    images = torch.cat(images)
    prov = model.pipeline.provenance if model.pipeline else model.config.provenance
    return {
        "model": path,
        "sha256": model.sha256,
        "latent_shape": list(model.latent_shape),
        "image_shape": list(model.image_shape),
        "sampler": model.sampling.sampler,
        "guidance": model.sampling.guidance,
        "steps": args.steps,
        **cost_per_image(model, args.steps, guided),
        "ms_per_image_wall": wall_ms,
        "ms_per_image_cpu": cpu_ms,
        "timing_batch": args.timing_n,
        "train_seconds": prov.get("train_seconds"),
        "train_steps": prov.get("step"),
        "train_images": prov.get("images_seen"),
        "train_images_per_s": prov["images_seen"] / prov["train_seconds"]
        if prov.get("train_seconds")
        else None,
        "fid_quadrants": fid(quadrant_features(extractor, images), real_q),
        **slot_accuracy(predict_slots(extractor, images), requested),
    }, images


def _command(args) -> str:
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None)
    return "python -m benchmarks.latent_vs_pixel " + flags


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--latent", required=True)
    p.add_argument("--pixel", default=None, help="the pixel baseline (omit: --latent alone)")
    p.add_argument("--n", type=int, default=200, help="samples per model (first n test slots)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=25)
    p.add_argument("--timing-n", type=int, default=8)
    p.add_argument("--ref-n", type=int, default=2000, help="real test scenes in the FID reference")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--grid", default=None, help="a PNG of the first 8 samples of each model")
    return p.parse_args()


def _alone(args, lat: dict, floor: float) -> None:
    summary = (
        f"{args.latent} alone, scenes 64x64, n={args.n}, {args.steps} steps: "
        f"{lat['train_steps']} train steps / {lat['train_seconds']} s; GFLOP/image "
        f"{lat['flops_per_image'] / 1e9:.2f}; CPU ms/image {lat['ms_per_image_cpu']:.0f}; digit "
        f"acc {lat['digit_accuracy']:.3f}; empty acc {lat['empty_accuracy']:.3f}; scene acc "
        f"{lat['scene_accuracy']:.3f}; FID-quadrants {lat['fid_quadrants']:.1f} (real floor "
        f"{floor:.1f})"
    )
    payload = {"command": _command(args), "n": args.n, "real_floor_fid_quadrants": floor}
    print(summary)
    print(write_result("scenes_model_eval", {**payload, "latent": lat}, summary))


def _grid(path: str, test, grids: dict) -> None:
    from difforge.pipeline import save_grid_png

    images = torch.cat([grids["latent"][:8], grids["pixel"][:8]])
    slots = ["".join("_" if int(v) == EMPTY else str(int(v)) for v in s) for s in test.slots[:8]]
    caps = [f"L {c}" for c in slots] + [f"P {c}" for c in slots]
    save_grid_png(path, images, captions=caps, nrow=8)


def _compare(args, lat: dict, pix: dict, floor: float, extractor) -> None:
    ratio = pix["flops_per_image"] / lat["flops_per_image"]
    ratio_ms = pix["ms_per_image_cpu"] / lat["ms_per_image_cpu"]
    payload = {
        "command": _command(args),
        "n": args.n,
        "real_floor_fid_quadrants": floor,
        "reference": {
            "scenes": "scenes:test",
            "ref_n": args.ref_n,
            "feature_net": extractor.sha256,
        },
        "latent": lat,
        "pixel": pix,
        "flops_ratio_pixel_over_latent": ratio,
        "cpu_ms_ratio_pixel_over_latent": ratio_ms,
        "target_3x_cheaper_at_equal_or_better_slot_accuracy": bool(
            ratio >= 3 and lat["digit_accuracy"] >= pix["digit_accuracy"]
        ),
    }
    summary = (
        f"scenes 64x64, n={args.n}, {args.steps} steps, equal train wall-clock (latent "
        f"{lat['train_seconds']} s / {lat['train_images']} images, pixel {pix['train_seconds']} s "
        f"/ {pix['train_images']} images): GFLOP/image latent {lat['flops_per_image'] / 1e9:.2f} "
        f"(incl. decode {lat['decode_flops'] / 1e9:.2f}) vs pixel {pix['flops_per_image'] / 1e9:.2f} "
        f"({ratio:.1f}x); CPU ms/image {lat['ms_per_image_cpu']:.0f} vs "
        f"{pix['ms_per_image_cpu']:.0f} ({ratio_ms:.1f}x); digit acc {lat['digit_accuracy']:.3f} vs "
        f"{pix['digit_accuracy']:.3f}; empty acc {lat['empty_accuracy']:.3f} vs "
        f"{pix['empty_accuracy']:.3f}; FID-quadrants {lat['fid_quadrants']:.1f} vs "
        f"{pix['fid_quadrants']:.1f} (real floor {floor:.1f})"
    )
    out = write_result("latent_vs_pixel", payload, summary)
    print(summary)
    print(out)


def main() -> None:
    args = _parse()
    torch.set_num_threads(args.threads)
    test = load_scenes("test")
    extractor = load_feature_extractor()
    ref = test.images[args.n : args.n + args.ref_n]  # disjoint from the scenes whose slots we ask
    real_q = quadrant_features(extractor, ref)
    floor = fid(quadrant_features(extractor, test.images[: args.n]), real_q)
    results, grids = {}, {}
    for name in ("latent", "pixel"):
        if getattr(args, name):
            results[name], grids[name] = evaluate(
                getattr(args, name), args, test, extractor, real_q
            )
    if not args.pixel:  # one model alone: its own row, no comparison
        _alone(args, results["latent"], floor)
        return
    if args.grid:
        _grid(args.grid, test, grids)
    _compare(args, results["latent"], results["pixel"], floor, extractor)


if __name__ == "__main__":
    main()
