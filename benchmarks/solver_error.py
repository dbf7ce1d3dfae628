"""Solver error per NFE: RMSE of the final image against a converged reference from the same noise.

    python -m benchmarks.solver_error [--model models/mnist-cond] [--n 200] [--nfe 4,5,6,8,10]
        [--guidance 2] [--ref-steps 200] [--samplers all] [--grids karras,vp_linspace]
        [--diffusers ddim,dpmsolver,...] [--threads 1]

For deterministic solvers the final image is a function of the initial noise, so its distance to
the exact ODE solution from the same noise measures the solver alone, with far fewer images than
FID needs (at n = 200 the real-data FID floor itself varies by +-9). The exact solution is
approximated by Heun with --ref-steps steps (2 x steps - 1 NFE) on the Karras grid. RMSE is in
pixel units of the data space ([-1, 1]), over all pixels and images.

One network drives every loop: the model's guided denoiser D_w (CFGDenoiser, cond and uncond in
one batch, one NFE). diffusers' schedulers step the same D_w seen as a DDPM eps-prediction network
on the 1000-step linear-beta grid (benchmarks.quality_vs_nfe.VPEpsAdapter), all with timesteps
starting at t = 999 (DDIM with "trailing" spacing, clip_sample off), so all start from the same
state x_ve = sqrt(1 + sigma_T^2) z at sigma_T = 157.4; their reference is Heun from that state.
difforge samplers run on two grids: the model's Karras grid (0.002-80, from x = 80 z, against a
reference from there) and "vp_linspace", the levels diffusers' multistep schedulers visit, from
diffusers' start state and against diffusers' reference: there a difforge sampler and a diffusers
scheduler solve the same ODE from the same state on the same levels. Same z, labels (i mod 10)
and guidance for every method: every comparison is paired.

DDIM (eta = 0) is Euler in VE space and is not repeated. Heun at <= 5 steps is left out (difforge.samplers.advice): at the NFE budgets here it would get
2-5 steps. Stochastic samplers are not measured (their image is not a function of z alone).
Numbers are RMSEs, not timings, so machine load does not bias them.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

from benchmarks.common import write_result
from benchmarks.quality_vs_nfe import SCHEDULE, VPEpsAdapter
from difforge.core import DiscreteVP, get_sigmas, sigmas_from_timesteps
from difforge.evaluation.sweep import steps_for_nfe
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import Model, load
from difforge.samplers import SAMPLERS, PerSampleNoise, expected_nfe
from difforge.samplers.advice import few_step_problem

ROOT = Path(__file__).resolve().parent.parent
VP = DiscreteVP(SCHEDULE["beta_schedule"], 1000, SCHEDULE["beta_start"], SCHEDULE["beta_end"])
# stochastic (no fixed ODE solution), or another name for a measured solver (ddim at eta 0 = euler)
NOT_MEASURED = {"ddim", "ddpm", "euler_ancestral", "dpmpp_2m_sde", "dpmpp_3m_sde"}
# option -> (label, diffusers class, config overrides); every one starts at t = 999
DIFFUSERS = {
    "ddim": ("DDIMScheduler(trailing)", "DDIMScheduler",
             {"timestep_spacing": "trailing", "clip_sample": False}),
    "dpmsolver": ("DPMSolverMultistepScheduler", "DPMSolverMultistepScheduler", {}),
    "dpmsolver_karras": ("DPMSolverMultistepScheduler(karras)", "DPMSolverMultistepScheduler",
                         {"use_karras_sigmas": True}),
    "dpmsolver3": ("DPMSolverMultistepScheduler(order 3)", "DPMSolverMultistepScheduler",
                   {"solver_order": 3}),
    "euler": ("EulerDiscreteScheduler", "EulerDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", "UniPCMultistepScheduler", {}),
    "unipc_karras": ("UniPCMultistepScheduler(karras)", "UniPCMultistepScheduler",
                     {"use_karras_sigmas": True}),
    "deis": ("DEISMultistepScheduler", "DEISMultistepScheduler", {}),
}  # fmt: skip


def guided(model: Model, labels: list[int], guidance: float) -> dict:
    cond = {"labels": torch.tensor(labels, dtype=torch.int64)}
    uncond = {"labels": torch.full((len(labels),), model.num_classes, dtype=torch.int64)}
    return {"cond": cond, "uncond": uncond, "guidance": guidance}


def run_diffusers(model, option, steps, z, labels, guidance) -> tuple[Tensor, int]:
    import diffusers

    _, cls_name, overrides = DIFFUSERS[option]
    sched = getattr(diffusers, cls_name)(**SCHEDULE, **overrides)
    sched.set_timesteps(steps)
    eps_net = VPEpsAdapter(model, guidance, labels)
    x = z * sched.init_noise_sigma
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(eps_net(sched.scale_model_input(x, t), t), t, x).prev_sample
    return x, eps_net.calls


def heun_reference(model, sigma_start, steps, z, labels, guidance, x_scale) -> Tensor:
    """Heun with `steps` Karras steps from (sigma_start, x_scale z) down to the model's sigma_min."""
    sigmas = get_sigmas("karras", steps, model.process.sigma_min, sigma_start)
    return run_from(model, "heun", sigmas, z * x_scale, labels, guidance)


def run_from(model, name, sigmas, x_start, labels, guidance) -> Tensor:
    """A difforge sampler from an explicit start state (used for the references)."""
    from difforge.core import CFGDenoiser

    g = guided(model, labels, guidance)
    den = CFGDenoiser(model.denoiser, torch.tensor(float(guidance)), g["uncond"])
    with torch.no_grad():
        return SAMPLERS[name](den, x_start, sigmas, cond=g["cond"])


def rmse(a: Tensor, b: Tensor) -> float:
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "mnist-cond"))
    ap.add_argument("--n", type=int, default=200, help="images [200]")
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--ref-steps", type=int, default=200, help="Heun steps of the reference [200]")
    ap.add_argument("--samplers", default="all", help="difforge deterministic samplers, or all")
    ap.add_argument("--diffusers", default="ddim,dpmsolver,dpmsolver_karras,euler,unipc,deis")
    ap.add_argument(
        "--grids",
        default="karras,vp_linspace",
        help="difforge grids: karras,exponential,vp_linspace",
    )
    ap.add_argument("--seed", type=int, default=0, help="image i uses seed + i [0]")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. load)")
    return ap.parse_args()


def main() -> int:
    args = parse_args()
    with compute_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    model = load(args.model)
    nfes = [int(v) for v in args.nfe.split(",")]
    names = [n for n in SAMPLERS if n not in NOT_MEASURED] if args.samplers == "all" else (
        args.samplers.split(",")
    )  # fmt: skip
    options = [o for o in args.diffusers.split(",") if o]
    unknown = [o for o in options if o not in DIFFUSERS]
    if unknown:
        print(f"unknown --diffusers {unknown}; allowed: {', '.join(DIFFUSERS)}", file=sys.stderr)
        return 2
    labels = [i % model.num_classes for i in range(args.n)]
    z = PerSampleNoise([args.seed + i for i in range(args.n)]).draw(model.image_shape)
    sigma_t = VP.sigma_max  # sigma at t = 999, where every diffusers loop starts
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    start = time.perf_counter()
    sigma_max = model.process.sigma_max
    refs = {"ve": heun_reference(model, sigma_max, args.ref_steps, z, labels, args.guidance,
                                       sigma_max)}  # fmt: skip
    if options or "vp_linspace" in args.grids:
        refs["vp"] = heun_reference(
            model, sigma_t, args.ref_steps, z, labels, args.guidance, math.sqrt(1 + sigma_t**2)
        )
    log(f"references ({time.perf_counter() - start:.0f} s)")
    rows, left_out = [], []
    for target in nfes:
        for grid in args.grids.split(","):
            for name in names:
                rows += run_point(model, name, grid, target, z, labels, args, refs, left_out, log)
        for option in options:
            x, nfe = run_diffusers(model, option, target, z, labels, args.guidance)
            err = rmse(x, refs["vp"])
            rows.append({"family": "diffusers", "method": DIFFUSERS[option][0],
                         "target_nfe": target, "nfe": nfe, "steps": target, "rmse": err})  # fmt: skip
            log(f"  {target:3d} {DIFFUSERS[option][0]:16s} {err:.4f}")
    ref_gap = rmse(refs["ve"], refs["vp"]) if "vp" in refs else None
    summary, best = summarize(rows, nfes, args)
    payload = {
        "model": model.name, "model_sha256": model.sha256, "n": args.n, "guidance": args.guidance,
        "nfe": nfes, "reference": f"heun:{args.ref_steps} (Karras, from each family's start)",
        "reference_rmse_difforge_vs_diffusers_start": ref_gap, "rows": rows, "best": best,
        "left_out": left_out, "note": args.note, "seconds": time.perf_counter() - start,
    }  # fmt: skip
    out = write_result("solver_error", payload, summary)
    print(summary)
    print("wrote", out)
    return 0


def make_grid(model, grid: str, steps: int) -> Tensor:
    """difforge's grid kinds, or "vp_linspace": the levels DPMSolverMultistep, UniPC and DEIS visit
    (timesteps linspace(0, 999, steps + 1) rounded, largest first, the last dropped) then 0."""
    if grid != "vp_linspace":
        return get_sigmas(grid, steps, process=model.process)
    t = torch.linspace(0, 999, steps + 1, dtype=torch.float64).round().flip(0)[:-1]
    return sigmas_from_timesteps(VP, t)


def run_point(model, name, grid, target, z, labels, args, refs, left_out, log) -> list[dict]:
    """One difforge sampler at one NFE budget on one grid kind: [] when left out."""
    steps = steps_for_nfe(_Nfe(name), target) if expected_nfe(name, 1) <= target else 0
    sig = make_grid(model, grid, steps) if steps else None
    problem = "too few NFE" if sig is None else few_step_problem(name, sig)
    if problem:
        left_out.append({"method": name, "grid": grid, "target_nfe": target, "why": problem})
        return []
    s0 = sig[0].item()
    if grid == "vp_linspace":  # diffusers' start state, hence its reference
        x, ref = run_from(model, name, sig, z * math.sqrt(1 + s0**2), labels, args.guidance), "vp"
    else:
        x, ref = run_from(model, name, sig, z * s0, labels, args.guidance), "ve"
    err = rmse(x, refs[ref])
    method = name if grid == "karras" else f"{name}({grid})"
    log(f"  {target:3d} {method:16s} {err:.4f}")
    return [{"family": "difforge", "method": method, "grid": grid, "target_nfe": target,
             "nfe": expected_nfe(name, steps), "steps": steps, "rmse": err}]  # fmt: skip


class _Nfe:
    """Adapts a sampler name to `steps_for_nfe`'s method protocol."""

    def __init__(self, name: str):
        self.name = name

    def nfe(self, steps: int) -> int:
        return expected_nfe(self.name, steps)


def summarize(rows: list[dict], nfes: list[int], args) -> tuple[str, dict]:
    best: dict = {}
    parts = [f"n={args.n}, guidance {args.guidance:g}, ref heun-{args.ref_steps}"]
    for target in nfes:
        here = {fam: [r for r in rows if r["family"] == fam and r["target_nfe"] == target]
                for fam in ("difforge", "diffusers")}  # fmt: skip
        b = {fam: min(rs, key=lambda r: r["rmse"]) for fam, rs in here.items() if rs}
        best[str(target)] = {
            fam: {"method": r["method"], "rmse": r["rmse"]} for fam, r in b.items()
        }
        text = ", ".join(f"{r['method']} {r['rmse']:.3f}" for r in b.values())
        parts.append(f"@{target} NFE best {text}")
    if args.note:
        parts.append(args.note)
    return "; ".join(parts), best


if __name__ == "__main__":
    sys.exit(main())
