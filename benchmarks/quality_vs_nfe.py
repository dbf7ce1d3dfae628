"""Sample quality against NFE: every difforge sampler, and diffusers' schedulers on the same network.

    python -m benchmarks.quality_vs_nfe [--model models/mnist-cond] [--n 300] [--nfe 5,8,10,15,20]
        [--reference heun:100] [--diffusers ddim,dpmsolver,euler] [--threads 1] [--quick]

One network drives every loop: the model's EDM-preconditioned denoiser D(x; sigma), in VE space.
diffusers' DDIMScheduler, DPMSolverMultistepScheduler and EulerDiscreteScheduler step a DDPM
eps-prediction model in VP space on the 1000-step linear-beta grid (their defaults), so D is
wrapped once as such a model (`VPEpsAdapter`):

    sigma_t = sqrt((1 - abar_t) / abar_t)               DDPM linear schedule (Ho et al. 2020); a
                                                        fractional t interpolates sigma linearly,
                                                        as diffusers' Euler scheduler does
    x_ve    = x_vp * sqrt(1 + sigma_t^2)                x_vp = sqrt(abar_t) x_ve (Karras et al.
                                                        2022, Eq. 10 with s = sqrt(abar))
    eps_hat = (x_ve - D_w(x_ve; sigma_t)) / sigma_t     x = x0 + sigma eps (Karras et al., Eq. 2)

D_w is the classifier-free-guided denoiser built by `difforge.core.CFGDenoiser`, the combinator
difforge's own samplers use, so guidance is applied the same way in every loop (cond and uncond
halves in one batched forward, counted as one NFE). DDIM's x0 = (x_vp - sqrt(1 - abar) eps_hat) /
sqrt(abar) then equals D_w exactly. Every method starts from the same per-image noise seeds and
labels (scaled by the scheduler's init_noise_sigma), so all points are paired comparisons.

Budget: the full run draws n images at each sampler x NFE point. NFE per image: 5 one-eval
samplers (ddim and ddpm, aliases of euler and euler_ancestral, are left out of "all") x
(5+8+10+15+20) + Heun (5+7+9+15+19) + 3 schedulers x 58 + the Heun-100 reference (199) = 718;
with guidance each NFE is a batch of 2 forwards, and a ~1M-parameter U-Net costs ~7 ms per image
forward at batch 64 on the 2-core dev CPU, so one image costs ~10 s and n = 300 fits in under an
hour (FID needs n > 128, the feature dimension). At n = 300 FID is
biased upward (by ~1/n); every point has the same n, and the run also records the FID of n real
training images against the same reference (the floor at this n) and KID, which is unbiased.

Targets, reported met or not with the numbers: (1) the best difforge sampler at 10 NFE within
1.15x of the reference FID; (2) at 5, 8 and 10 NFE the best difforge sampler beats the best
diffusers scheduler on FID.

`--quick` checks the pipeline end to end in a few minutes: n = 130, NFE 5, Heun-5 reference, and
an untrained tiny random model when the --model folder is missing (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import RESULTS_DIR, write_result
from difforge.core import CFGDenoiser, DiscreteVP
from difforge.core.parameterization import eps_from_x0
from difforge.data.mnist import load_mnist
from difforge.evaluation import (
    SweepConfig,
    evaluate_images,
    load_feature_extractor,
    nfe_sweep,
    plot_sweep,
)
from difforge.evaluation.against import default_reference
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import (
    Model,
    ModelConfig,
    NetSpec,
    SamplingDefaults,
    load,
    save_model,
    to_uint8,
)
from difforge.samplers import PerSampleNoise, expected_nfe

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "mnist-cond"

# option -> (method name, diffusers class, config overrides); all on the DDPM linear schedule
DIFFUSERS = {
    "ddim": ("DDIMScheduler", "DDIMScheduler", {}),
    "ddim_trailing": ("DDIMScheduler(trailing)", "DDIMScheduler", {"timestep_spacing": "trailing"}),
    "dpmsolver": ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    "dpmsolver_karras": (
        "DPMSolverMultistepScheduler(karras)", "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True},
    ),
    "euler": ("EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
    "euler_karras": (
        "EulerDiscreteScheduler(karras)", "EulerDiscreteScheduler", {"use_karras_sigmas": True},
    ),
}  # fmt: skip
SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4}
SCHEDULE |= {"beta_end": 0.02, "prediction_type": "epsilon"}


class VPEpsAdapter:
    """A difforge denoiser seen as a DDPM eps-prediction network on a DiscreteVP grid.

    eps_hat(x_vp, t) = (x_ve - D_w(x_ve; sigma_t)) / sigma_t with x_ve = x_vp sqrt(1 + sigma_t^2)
    (see the module docstring). Counts its calls: one per scheduler step is one NFE.
    """

    def __init__(self, model: Model, guidance: float, labels: list[int] | None):
        self.process = DiscreteVP("linear", 1000, 1e-4, 0.02)
        self.cond = None
        self.denoiser = model.denoiser
        if labels is not None:
            self.cond = {"labels": torch.tensor(labels, dtype=torch.int64)}
            null = torch.full((len(labels),), model.num_classes, dtype=torch.int64)
            if guidance != 1.0:
                self.denoiser = CFGDenoiser(model.denoiser, guidance, {"labels": null})
        self.calls = 0

    def __call__(self, x_vp: Tensor, t: Tensor) -> Tensor:
        self.calls += 1
        b = x_vp.shape[0]
        sigma = self.process.t_to_sigma(t.double()).float().reshape(1).expand(b)  # (B,)
        s = sigma.view(b, 1, 1, 1)
        x_ve = x_vp * (1 + s**2).sqrt()
        return eps_from_x0(x_ve, s, self.denoiser(x_ve, sigma, self.cond))


class DiffusersMethod:
    """A diffusers scheduler's sampling loop (as its pipelines run it) on a difforge model."""

    family = "diffusers"

    def __init__(self, model: Model, option: str, guidance: float):
        self.model, self.guidance = model, guidance
        self.name, self.cls_name, self.overrides = DIFFUSERS[option]

    def _scheduler(self):
        import diffusers

        return getattr(diffusers, self.cls_name)(**SCHEDULE, **self.overrides)

    def nfe(self, steps: int) -> int:
        return steps  # one eps evaluation per step for all three

    def draw(self, steps: int, labels: list[int] | None, seeds: list[int]) -> tuple[Tensor, int]:
        sched = self._scheduler()
        sched.set_timesteps(steps)
        eps_net = VPEpsAdapter(self.model, self.guidance, labels)
        x = PerSampleNoise(seeds).draw(self.model.image_shape) * sched.init_noise_sigma
        with torch.no_grad():
            for t in sched.timesteps:
                eps = eps_net(sched.scale_model_input(x, t), t)
                x = sched.step(eps, t, x).prev_sample
        return to_uint8(x), eps_net.calls

    def describe(self, steps: int) -> dict[str, Any]:
        sched = self._scheduler()
        sched.set_timesteps(steps)
        config = {k: v for k, v in sched.config.items() if not k.startswith("_")}
        return {
            "library": "diffusers",
            "scheduler": self.cls_name,
            "config": config,
            "timesteps": [float(t) for t in sched.timesteps],
            "guidance": self.guidance,
            "adapter": "eps_hat = (x_ve - D_w(x_ve; sigma_t)) / sigma_t on the DDPM linear grid",
        }


def tiny_random_model(folder: Path) -> Path:
    """An untrained 8k-parameter class-conditional EDM U-Net on 28x28: checks plumbing only."""
    from difforge.nets import UNetConfig, build_net

    cfg = UNetConfig(
        in_channels=1, out_channels=1, image_size=28, base_channels=8, channel_mults=(1,),
        num_res_blocks=1, attention_resolutions=(), head_dim=8, num_classes=10, norm_groups=4,
        emb_mult=1,
    )  # fmt: skip
    torch.manual_seed(0)
    net = build_net("unet", cfg)
    with torch.no_grad():  # the zero-initialised output layer would make every image the same
        for p in net.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    config = ModelConfig(
        name="tiny-random",
        net=NetSpec(kind="unet", config=cfg.to_dict()),
        process={"kind": "ve", "sigma_min": 0.002, "sigma_max": 80.0},
        parameterization="edm",
        num_classes=10,
        image_shape=(1, 28, 28),
        sampling=SamplingDefaults(sampler="dpmpp_2m", steps=20, guidance=3.0),
    )
    return save_model(folder, config, net.state_dict(), "# tiny-random\n\nuntrained\n")


def load_model_or_tiny(path: str | None, quick: bool) -> tuple[Model, str | None]:
    """The model at `path` (default models/mnist-cond); with --quick, a tiny one if it is missing."""
    folder = Path(path) if path else DEFAULT_MODEL
    if folder.exists() or not quick:
        return load(folder), None
    note = f"{folder} not found: untrained tiny random model, numbers are meaningless"
    print(f"note: {note}", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:  # loaded into memory; the folder can go
        return load(tiny_random_model(Path(tmp) / "tiny-random")), note


def ms_per_forward(model: Model, batch: int = 64) -> float:
    """Milliseconds per image of one denoiser forward at `batch` (the cost unit of the estimate)."""
    x = torch.randn(batch, *model.image_shape)
    sigma = torch.full((batch,), 1.0)
    cond = {"labels": torch.zeros(batch, dtype=torch.int64)} if model.num_classes else None
    with torch.no_grad():
        model.denoiser(x, sigma, cond)
        t0 = time.perf_counter()
        model.denoiser(x, sigma, cond)
    return 1e3 * (time.perf_counter() - t0) / batch


def real_data_floor(n: int, extractor, reference) -> dict[str, float]:
    """FID/KID of n real training images against the reference: the best any model gets at n."""
    train = load_mnist("train")
    r = evaluate_images(train.images[:n], None, extractor, reference)
    return {k: r["metrics"][k] for k in ("fid", "kid_mean")}


def best(points: list[dict], family: str, target: int) -> dict | None:
    pts = [p for p in points if p["family"] == family and p["target_nfe"] == target]
    return min(pts, key=lambda p: p["metrics"]["fid"], default=None)


def judge(sweep: dict) -> dict[str, Any]:
    """The two targets, met or not, with the numbers behind them."""
    ref = sweep["reference_line"]["metrics"]
    points = sweep["points"]
    out: dict[str, Any] = {"reference_fid": ref["fid"], "reference_kid": ref["kid_mean"]}
    b10 = best(points, "difforge", 10)
    out["best_difforge_10nfe_within_1.15x_reference"] = None if b10 is None else {
        "sampler": b10["method"], "nfe": b10["nfe"], "fid": b10["metrics"]["fid"],
        "kid": b10["metrics"]["kid_mean"], "ratio": b10["metrics"]["fid"] / ref["fid"],
        "met": b10["metrics"]["fid"] <= 1.15 * ref["fid"],
    }  # fmt: skip
    beats = {}
    for target in (5, 8, 10):
        ours, theirs = best(points, "difforge", target), best(points, "diffusers", target)
        if ours is None or theirs is None:
            continue
        beats[str(target)] = {
            "difforge": ours["method"], "difforge_fid": ours["metrics"]["fid"],
            "difforge_kid": ours["metrics"]["kid_mean"], "diffusers": theirs["method"],
            "diffusers_fid": theirs["metrics"]["fid"],
            "diffusers_kid": theirs["metrics"]["kid_mean"],
            "met": ours["metrics"]["fid"] < theirs["metrics"]["fid"],
        }  # fmt: skip
    out["best_difforge_beats_best_diffusers"] = beats
    return out


def summary_line(sweep: dict, targets: dict, note: str | None) -> str:
    ref = sweep["reference_line"]
    parts = [
        f"{sweep['model']['name']}, n={sweep['num_samples']}, guidance {sweep['guidance']:g}",
        f"ref {ref['method']}-{ref['steps']} FID {ref['metrics']['fid']:.3g} "
        f"KID {ref['metrics']['kid_mean']:.3g}",
    ]
    t = targets["best_difforge_10nfe_within_1.15x_reference"]
    if t is not None:
        verdict = "met" if t["met"] else "NOT met"
        parts.append(
            f"@10 NFE {t['sampler']} FID {t['fid']:.3g} = {t['ratio']:.2f}x ref ({verdict})"
        )
    for nfe, b in targets["best_difforge_beats_best_diffusers"].items():
        verdict = "met" if b["met"] else "NOT met"
        parts.append(
            f"@{nfe}: {b['difforge']} {b['difforge_fid']:.3g} vs {b['diffusers']} "
            f"{b['diffusers_fid']:.3g} ({verdict})"
        )
    return ("QUICK (plumbing only): " if note else "") + "; ".join(parts)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"model folder [default: {DEFAULT_MODEL}]")
    ap.add_argument("--n", type=int, default=None, help="images per point [300; quick 130]")
    ap.add_argument("--nfe", default=None, help="NFE budgets [5,8,10,15,20; quick 5]")
    ap.add_argument("--reference", default=None, help="SAMPLER:STEPS [heun:100; quick heun:5]")
    ap.add_argument("--diffusers", default="ddim,dpmsolver,euler", help=", ".join(DIFFUSERS))
    ap.add_argument("--samplers", default="all", help="difforge samplers, or all")
    ap.add_argument("--guidance", type=float, default=None, help="[the model's default]")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="torch + BLAS threads [1]")
    ap.add_argument("--quick", action="store_true")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    with compute_threads(args.threads):  # for the whole run, so RESULTS.md records them
        return run(args)


def run(args: argparse.Namespace) -> int:
    model, note = load_model_or_tiny(args.model, args.quick)
    ref_name, _, ref_steps = (args.reference or ("heun:5" if args.quick else "heun:100")).partition(
        ":"
    )
    config = SweepConfig(
        samplers="all" if args.samplers == "all" else tuple(args.samplers.split(",")),
        nfe=tuple(int(v) for v in (args.nfe or ("5" if args.quick else "5,8,10,15,20")).split(",")),
        n=args.n or (130 if args.quick else 300), guidance=args.guidance,
        batch_size=args.batch_size, reference_sampler=ref_name, reference_steps=int(ref_steps),
    )  # fmt: skip
    unknown = [d for d in args.diffusers.split(",") if d not in DIFFUSERS]
    if unknown:
        print(f"unknown --diffusers {unknown}; allowed: {', '.join(DIFFUSERS)}", file=sys.stderr)
        return 2
    guidance = config.guidance if config.guidance is not None else model.config.sampling.guidance
    theirs = [DiffusersMethod(model, d, guidance) for d in args.diffusers.split(",")]
    cost = ms_per_forward(model)
    extractor = load_feature_extractor()
    reference = default_reference(config.reference_split, extractor)
    floor = real_data_floor(config.n, extractor, reference)
    per_image = sum(config.nfe) * (len(config.samplers) + len(theirs))
    per_image += expected_nfe(config.reference_sampler, config.reference_steps)
    projected = per_image * (2 if guidance != 1 else 1) * cost / 1e3 * config.n
    print(
        f"~{cost:.1f} ms per image forward: projected sampling ~{projected / 60:.0f} min",
        file=sys.stderr,
    )
    stem = "quality_vs_nfe_quick" if args.quick else "quality_vs_nfe"
    partial = RESULTS_DIR / f"{stem}.partial.json"  # rewritten after every point
    sweep = nfe_sweep(
        model, config, methods=theirs, extractor=extractor, reference=reference,
        out=partial, log=lambda s: print(s, file=sys.stderr),
    )  # fmt: skip
    plot = plot_sweep(sweep, RESULTS_DIR / f"{stem}.png")
    targets = judge(sweep)
    payload = {
        "model_note": note, "ms_per_image_forward": cost, "projected_sampling_s": projected,
        "real_data_floor": floor, "targets": targets, "plot": str(plot.relative_to(ROOT)),
        "sweep": sweep,
    }  # fmt: skip
    summary = summary_line(sweep, targets, note) + f"; real-data floor FID {floor['fid']:.3g}"
    out = write_result(stem, payload, summary)
    partial.unlink(missing_ok=True)
    print(summary)
    print(f"wrote {out} and {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
