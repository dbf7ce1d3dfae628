"""Reconstruction quality of a scenes VAE on held-out test scenes: PSNR, rFID (FID in the
per-quadrant MNIST feature space between reconstructions and originals) and the per-digit
classifier accuracy on reconstructed digits (the MNIST classifier per quadrant).

    python -m benchmarks.vae_reconstruction --vae runs/scenes-vae --n 1000 --threads 1
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import write_result
from benchmarks.latent_vs_pixel import quadrant_features
from difforge.data.scenes import load_scenes
from difforge.evaluation.features import load_feature_extractor
from difforge.evaluation.metrics import fid
from difforge.evaluation.scenes import predict_slots, psnr, slot_accuracy
from difforge.pipeline.artifact import load_component
from difforge.pipeline.model import to_uint8


def _steps(p: dict) -> str:
    init = p.get("init_sha256")
    where = f" after init from sha256 {init[:12]}" if init else ""
    return f"{p.get('steps')} steps{where}, {p.get('train_seconds')} s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vae", required=True)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    config, vae, sha, _ = load_component(args.vae, "vae")
    test = load_scenes("test")
    x, slots = test.images[: args.n], test.slots[: args.n]
    with torch.no_grad():
        rec = torch.cat(
            [
                to_uint8(vae.decode(vae.encode(x[i : i + 100].float() / 127.5 - 1)[0]))
                for i in range(0, len(x), 100)
            ]
        )
    e = load_feature_extractor()
    pred_real, pred_rec = predict_slots(e, x), predict_slots(e, rec)
    real, recon = slot_accuracy(pred_real, slots), slot_accuracy(pred_rec, slots)
    agree = float((pred_real == pred_rec).float().mean())
    rfid = fid(quadrant_features(e, rec), quadrant_features(e, x))
    payload = {
        "command": f"python -m benchmarks.vae_reconstruction --vae {args.vae} --n {args.n} --threads {args.threads}",
        "n": args.n,
        "vae": {"path": args.vae, "sha256": sha, "scaling_factor": config.scaling_factor,
                "latent_shape": list(config.latent_shape), "provenance": config.provenance},
        "psnr_db": psnr(rec, x),
        "rfid_quadrants": rfid,
        "reconstructed": recon,
        "originals": real,
        "slot_agreement_real_vs_reconstructed": agree,
        "feature_net": e.sha256,
    }  # fmt: skip
    summary = (
        f"{args.vae} ({_steps(config.provenance)}) on {args.n} test scenes: PSNR "
        f"{payload['psnr_db']:.2f} dB, rFID-quadrants {rfid:.2f}, digit accuracy on reconstructions "
        f"{recon['digit_accuracy']:.4f} (originals {real['digit_accuracy']:.4f}), empty "
        f"{recon['empty_accuracy']:.4f}, slot agreement {agree:.4f}"
    )
    print(summary)
    print(write_result("vae_reconstruction", payload, summary))


if __name__ == "__main__":
    main()
