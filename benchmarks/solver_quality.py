"""Few-step solvers at n >= 1000: RMSE against one converged reference, and FID/KID/label accuracy,
difforge against diffusers, k-diffusion and ComfyUI driving the same network from the same state.

    python -m benchmarks.solver_quality [--model models/mnist-cond] [--n 1000] [--nfe 4,5,6,8,10]
        [--guidance 2] [--batch 100] [--methods FAMILY:NAME[@GRID][=NFE/NFE...],...]
        [--ref deis:60] [--ref-n N] [--check-ref 0] [--threads 1] [--cached-only]
        [--name solver_quality]

One ODE per image. Image i (seed i, label i mod 10) starts where diffusers' schedulers start on the
DDPM linear-beta grid (t = 999, sigma_T = 157.4, x = sqrt(1 + sigma_T^2) z; see
benchmarks.quality_vs_nfe.VPEpsAdapter): its exact solution is the reference. A method whose grid
starts lower (difforge's and k-diffusion's Karras grid at the model's sigma_max = 80) starts from
the reference trajectory's own state at that sigma, so every method solves the same ODE and every
RMSE is against the same reference; nothing is compared across different noise. The reference is
--ref (a difforge multistep solver and its steps below sigma_max, plus 8 log-uniform steps above)
on a grid through every method's start sigma; --check-ref M measures it against Heun with 4x the
steps on the first M images (the RMSE it reports is the reference's own error bound).

Methods (one evaluation of the guided denoiser D_w per step for all of them, so steps = NFE):
  difforge:NAME@GRID   difforge.samplers.SAMPLERS[NAME] on GRID: a difforge grid kind (karras,
                       exponential, vp_time, ...) at the model's range, or vp_linspace (the levels
                       diffusers' multistep schedulers visit; benchmarks.solver_error.make_grid)
  diffusers:OPTION     a diffusers scheduler on its own timestep spacing (solver_error.DIFFUSERS)
  kdiff:NAME@GRID      k-diffusion 0.1.1's sample_NAME on its get_sigmas_GRID(n, 0.002, 80) (float32,
                       as it computes them), or get_sigmas_vp(n) for GRID vp (its VP-SDE grid,
                       from sigma 152.2 to t = 1e-3); dpm_fast takes (sigma_min, sigma_max, n)
  comfy:NAME@GRID      ComfyUI's sample_ipndm / sample_ipndm_v / sample_deis (its k_diffusion copy,
                       comfy/k_diffusion/sampling.py and deis.py) on k-diffusion's grids
  ...=4/5/6            a suffix: that method at these NFE only (each family's best per NFE)
Peers are imported from ./peers (or $DIFFORGE_PEERS): k-diffusion as scripts/setup_peers.sh installs
it, ComfyUI's three functions as peers/comfy_k/ (copied there by hand, never into difforge); a
family whose code is missing is skipped. --ref-n N computes the reference (the costliest piece,
~70 NFE per image) for the first N seeds only: RMSE is then on those, FID on all n.

Per method and NFE: RMSE (pixel units of [-1, 1], over all pixels and images) with a 95% bootstrap
CI over images; FID and KID in difforge's feature space (models/mnist-features, against MNIST
train) and label accuracy (that network's classifier head), as benchmarks.fewstep. At each NFE the
best difforge method (by RMSE, and by FID) is compared with the best of each peer family, paired by
image: the 95% bootstrap CI of the difference (same resampled images for both); a win needs the
whole interval below 0. Drawn images are cached as .npz under runs/solver_quality/ (keyed by the
model's sha256, guidance, seeds and method), so reruns and added methods are cheap.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import write_result
from benchmarks.solver_error import DIFFUSERS, VP, make_grid, run_diffusers
from difforge.core import CFGDenoiser, get_sigmas
from difforge.evaluation import evaluate_images, load_feature_extractor
from difforge.evaluation.against import default_reference
from difforge.evaluation.features import extract
from difforge.evaluation.metrics import feature_stats, fid_from_stats
from difforge.evaluation.reference import ReferenceStats
from difforge.pipeline import Model, load, to_uint8
from difforge.samplers import SAMPLERS, PerSampleNoise, expected_nfe

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / "runs" / "solver_quality"
PEERS = Path(os.environ.get("DIFFORGE_PEERS", ROOT / "peers"))
SIGMA_T = float(VP.sigma_max)  # sigma at t = 999: where every diffusers loop starts
# the finalists of the n=32 screen (RESULTS.md, solver_quality_screen): each family's best per NFE
DEFAULT_METHODS = "difforge:ipndm@vp_time,diffusers:unipc,kdiff:lms@vp=4/5/6,comfy:deis@vp=8/10"
FAMILIES = ("difforge", "diffusers", "kdiff", "comfy")
PEER_GROUP = {
    "diffusers": "diffusers",
    "kdiff": "k-diffusion/ComfyUI",
    "comfy": "k-diffusion/ComfyUI",
}


def peer_module(family: str):
    """k-diffusion's sampling module or ComfyUI's additions, or None when not installed."""
    if str(PEERS) not in sys.path:
        sys.path.insert(0, str(PEERS))
    try:
        return importlib.import_module(
            "k_diffusion.sampling" if family == "kdiff" else "comfy_k.sampling"
        )
    except ImportError:
        return None


class Method:
    """One spec FAMILY:NAME[@GRID]: its grid, its start sigma, and one batch of its images."""

    def __init__(self, spec: str, model: Model):
        spec, _, only = spec.partition("=")  # "=4/5/6": only at these NFE
        self.only = {int(v) for v in only.split("/")} if only else None
        family, _, rest = spec.partition(":")
        self.name, _, self.grid = rest.partition("@")
        if family not in FAMILIES:
            raise SystemExit(f"unknown family {family!r} in {spec!r}; allowed: {FAMILIES}")
        if family == "diffusers" and self.name not in DIFFUSERS:
            raise SystemExit(f"unknown diffusers option {self.name!r}; allowed: {list(DIFFUSERS)}")
        if family == "difforge" and expected_nfe(self.name, 3) != 3:
            raise SystemExit(f"{self.name}: only one-evaluation-per-step samplers are compared")
        self.family, self.spec, self.model = family, spec, model
        self.label = DIFFUSERS[self.name][0] if family == "diffusers" else spec

    def at(self, nfe: int) -> bool:
        return self.only is None or nfe in self.only

    def sigmas(self, steps: int) -> Tensor:
        """The levels the method visits (float64 here; k-diffusion grids are float32 as it makes
        them); diffusers' own scheduler chooses its levels (None)."""
        if self.family == "difforge":
            return make_grid(self.model, self.grid, steps)
        K = peer_module("kdiff")
        p = self.model.process
        if self.grid == "vp":
            return K.get_sigmas_vp(steps)
        return getattr(K, f"get_sigmas_{self.grid}")(steps, p.sigma_min, p.sigma_max)

    def start_sigma(self) -> float:
        if self.family == "diffusers" or self.name == "dpm_fast":
            return SIGMA_T if self.family == "diffusers" else float(self.model.process.sigma_max)
        return float(self.sigmas(4)[0])

    def run(self, x_start: Tensor, z: Tensor, labels: list[int], w: float, steps: int) -> Tensor:
        if self.family == "diffusers":
            x, nfe = run_diffusers(self.model, self.name, steps, z, labels, w)
            assert nfe == steps
            return x
        den, cond = guided_denoiser(self.model, labels, w)
        with torch.no_grad():
            if self.family == "difforge":
                return SAMPLERS[self.name](den, x_start, self.sigmas(steps), cond=cond)
            fn = lambda x, s, **kw: den(x, s, cond)  # noqa: E731  k-diffusion's model(x, sigma)
            mod = peer_module(self.family)
            if self.name == "dpm_fast":
                p = self.model.process
                return mod.sample_dpm_fast(
                    fn, x_start, p.sigma_min, p.sigma_max, steps, disable=True
                )
            return getattr(mod, f"sample_{self.name}")(
                fn, x_start, self.sigmas(steps), disable=True
            )


def guided_denoiser(model: Model, labels: list[int], w: float):
    cond = {"labels": torch.tensor(labels, dtype=torch.int64)}
    uncond = {"labels": torch.full((len(labels),), model.num_classes, dtype=torch.int64)}
    return CFGDenoiser(model.denoiser, torch.tensor(float(w)), uncond), cond


def start_sigmas(methods: list[Method]) -> list[float]:
    """Every start sigma of the non-diffusers methods, one per level within 1e-6 (relative)."""
    out: list[float] = []
    for s in sorted(m.start_sigma() for m in methods if m.family != "diffusers"):
        if not out or s > out[-1] * (1 + 1e-6):
            out.append(s)
    return out


def reference_grids(model: Model, steps: int, anchors: list[float], top: int = 8):
    """The reference's two grids: `top` log-uniform steps from sigma_T to sigma_max with every
    start sigma inserted (where the ODE is nearly linear: cheap and exact), then the Karras grid of
    `steps` levels from sigma_max to 0 (the multistep history restarts at sigma_max)."""
    p = model.process
    levels = torch.linspace(math.log(SIGMA_T), math.log(p.sigma_max), top + 1, dtype=torch.float64)
    # the anchors themselves, and no other level within 1e-6 of one (a near-zero step would make
    # the multistep weights ill-conditioned)
    others = [v for v in (*levels.exp()[1:-1].tolist(), SIGMA_T, p.sigma_max)
              if all(abs(v - a) > 1e-6 * a for a in anchors)]  # fmt: skip
    upper = torch.tensor(sorted({*others, *anchors}, reverse=True), dtype=torch.float64)
    return upper, get_sigmas("karras", steps, process=p)


def solve(model, solver: str, grid: Tensor, x: Tensor, labels, w, states: dict | None = None):
    """`solver` on `grid` from x; records the state after each step in `states` (by sigma)."""
    den, cond = guided_denoiser(model, labels, w)

    def keep(info):
        if states is not None:
            states[float(info.sigma_next)] = info.x

    with torch.no_grad():
        return SAMPLERS[solver](den, x, grid, cond=cond, callback=keep)


def starts(model, solver: str, upper: Tensor, z: Tensor, labels, w) -> dict[float, Tensor]:
    """The reference trajectory's state at every level of `upper` (from x = sqrt(1 + sigma_T^2) z)."""
    states = {float(upper[0]): z * math.sqrt(1 + SIGMA_T**2)}
    solve(model, solver, upper, states[float(upper[0])], labels, w, states)
    return states


def _npz(path: Path, **arrays) -> None:
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, **{k: v.numpy() for k, v in arrays.items()})
    os.replace(tmp, path)


def cached(path: Path, args, log, what: str, make, *make_args) -> dict[str, Tensor] | None:
    """The arrays at path, or make(*make_args) saved there; None under --cached-only when not
    drawn."""
    if path.exists():
        return {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    if args.cached_only:
        return None
    t0 = time.perf_counter()
    arrays = make(*make_args)
    path.parent.mkdir(parents=True, exist_ok=True)
    _npz(path, **arrays)
    log(f"{what} ({time.perf_counter() - t0:.0f} s)")
    return arrays


def draw(args, model: Model, methods: list[Method], nfes: list[int], log) -> dict:
    """Chunks of --batch seeds, in order, each piece cached as .npz (`draw_chunk`): the reference
    down to sigma_max through every start sigma (cheap), every method x NFE, and the reference
    below sigma_max (the costliest piece) for the first --ref-n seeds, RMSE being on those.
    Returns {"ref": (n_ref, C, H, W) or None, (label, nfe): (n, C, H, W)}; under --cached-only,
    the chunks drawn so far (args.n is set to their count)."""
    solver, steps = args.ref.split(":")
    anchors = start_sigmas(methods)
    upper, lower = reference_grids(model, int(steps), anchors)
    root = CACHE / f"{model.sha256[:16]}-w{args.guidance:g}"
    ref_dir = root / f"ref-{solver}-a{'_'.join(f'{a:.6g}' for a in anchors)}"
    chunks = []
    for lo in range(args.seed, args.seed + args.n, args.batch):
        seeds = list(range(lo, min(args.seed + args.n, lo + args.batch)))
        labels = [i % model.num_classes for i in seeds]
        chunks.append((seeds, labels, PerSampleNoise(seeds).draw(model.image_shape)))
    dirs = (root, ref_dir, solver, upper, lower, anchors)
    parts: dict = {(m.label, k): [] for m in methods for k in nfes if m.at(k)}
    refs: list[Tensor] = []
    for seeds, labels, z in chunks:  # chunk by chunk, so the first chunks are complete early
        if not draw_chunk(args, model, methods, nfes, log, (seeds, labels, z), parts, refs, dirs):
            break  # --cached-only: score the chunks drawn so far
    done = min(len(v) for v in parts.values())
    if done == 0:
        raise SystemExit("--cached-only: no chunk was drawn yet")
    args.n = sum(len(c[0]) for c in chunks[:done])  # what is scored
    out = {key: torch.cat(v[:done]) for key, v in parts.items()}
    out["ref"] = torch.cat(refs[:done]) if refs else None
    return out


def draw_chunk(args, model, methods, nfes, log, chunk, parts, refs, dirs) -> bool:
    """One chunk: the reference starts, every method x NFE, then (for seeds below --ref-n) the
    reference below sigma_max. Appends to parts / refs; False when a piece is missing under
    --cached-only (nothing of this chunk is then kept)."""
    (seeds, labels, z), (root, ref_dir, solver, upper, lower, anchors) = chunk, dirs
    tag = f"{seeds[0]}-{seeds[-1]}"
    st = cached(ref_dir / f"start-{tag}.npz", args, log, f"starts {tag}",
                _start_arrays, model, solver, upper, z, labels, args.guidance, anchors)  # fmt: skip
    if st is None:
        return False
    start = {a: st[f"s{a:.6g}"] for a in anchors}
    got = {}
    for m in methods:
        x0 = None if m.family == "diffusers" else start[nearest(m.start_sigma(), anchors)]
        name = m.spec.replace(":", "-").replace("@", "-")
        for k in filter(m.at, nfes):
            r = cached(root / name / f"nfe{k}-{tag}.npz", args, log, f"{m.label} nfe {k} {tag}",
                       lambda run, *a: {"x": run(*a).float()}, m.run, x0, z, labels, args.guidance, k)  # fmt: skip
            if r is None:
                return False
            got[(m.label, k)] = r["x"]
    for key, x in got.items():
        parts[key].append(x)
    drawn = len(parts[next(iter(parts))])  # chunks complete, this one included
    if seeds[0] < args.seed + args.ref_n and len(refs) == drawn - 1:  # refs stay a prefix
        x_max = start[nearest(model.process.sigma_max, anchors)]
        r = cached(ref_dir / f"{args.ref.replace(':', '-')}-{tag}.npz", args, log,
                   f"reference {tag}", lambda *a: {"final": solve(*a)},
                   model, solver, lower, x_max, labels, args.guidance)  # fmt: skip
        if r is not None:
            refs.append(r["final"])
    return True


def _start_arrays(model, solver, upper, z, labels, w, anchors) -> dict[str, Tensor]:
    st = starts(model, solver, upper, z, labels, w)
    return {f"s{a:.6g}": st[nearest(a, list(st))] for a in anchors}


def nearest(s: float, anchors: list[float]) -> float:
    return min(anchors, key=lambda a: abs(a - s))


def boot_ci(stat, n: int, reps: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of stat(idx) over `reps` resamples of n images (with replacement)."""
    gen = np.random.default_rng(seed)
    vals = np.array([stat(gen.integers(0, n, n)) for _ in range(reps)])
    lo, hi = np.percentile(vals, [2.5, 97.5])
    return float(lo), float(hi)


def score(images: dict, methods, nfes, args, against) -> list[dict]:
    """One row per method x NFE: RMSE (on the seeds with a reference) with its bootstrap CI, FID,
    KID and label accuracy (all n images); per-image MSEs and features kept for `compare`."""
    ref = None if images["ref"] is None else images["ref"].double()
    labels = seed_labels(args, methods[0].model.num_classes)
    rows = []
    for m in methods:
        for k in filter(m.at, nfes):
            x = images[(m.label, k)]
            row: dict = {"family": m.family, "method": m.label, "nfe": k, "n": len(x)}
            if ref is not None:
                mse = (x[: len(ref)].double() - ref).pow(2).flatten(1).mean(1).numpy()  # (n_ref,)
                ci = boot_ci(lambda i, e=mse: np.sqrt(e[i].mean()), len(mse), 1000, 0)
                row |= {"n_rmse": len(mse), "rmse": float(np.sqrt(mse.mean())), "rmse_ci95": ci}
                row["_mse"] = mse
            if len(x) > against[1].feature_dim:
                scores, row["_feats"] = image_scores(x, labels, against, args.seed)
                row |= scores
            rows.append(row)
    return rows


def seed_labels(args, num_classes: int) -> Tensor:
    """The class each seed's image was drawn with (seed i: class i mod num_classes)."""
    return torch.arange(args.seed, args.seed + args.n) % num_classes


def image_scores(x: Tensor, labels: Tensor, against, seed: int) -> tuple[dict, np.ndarray]:
    """FID, KID and label accuracy of images x in [-1, 1] against real data, and their features
    (for the paired comparisons and the distance to the converged solution)."""
    extractor, reference = against
    u8 = to_uint8(x)
    ev = evaluate_images(u8, labels, extractor, reference, seed=seed)["metrics"]
    scores = {"fid": ev["fid"], "kid": ev["kid_mean"], "acc": ev["label_accuracy"]}
    return scores, extract(extractor.features, u8)


def score_reference(
    images: dict, args, against, num_classes: int
) -> tuple[dict | None, ReferenceStats | None]:
    """FID, KID and label accuracy of the converged reference itself, when it covers all n seeds:
    what a solver with no error scores (a few-step FID below it comes from the solver's error);
    with its feature statistics, for `add_fid_to_converged`. (None, None) otherwise."""
    ref = images["ref"]
    if ref is None or len(ref) < args.n:
        return None, None
    extractor = against[0]
    scores, feats = image_scores(ref, seed_labels(args, num_classes), against, args.seed)
    stats = ReferenceStats(f"converged {args.ref}", "", extractor.name, extractor.sha256,
                           feats.astype(np.float32), *feature_stats(feats))  # fmt: skip
    return {"n": args.n, **scores}, stats


def add_fid_to_converged(rows: list[dict], converged: ReferenceStats) -> None:
    """Each row's Frechet distance to the converged solution's own images (same features): the
    solver's error as a distribution, which real-data FID is not at few NFE (see the README)."""
    for r in rows:
        if "_feats" in r:
            r["fid_converged"] = fid_from_stats(*feature_stats(r["_feats"]), converged.mu,
                                                converged.sigma)  # fmt: skip


def compare(a: dict, b: dict, what: str, reference, reps: int) -> dict:
    """a - b on the same resampled images (paired by seed), with its 95% bootstrap interval."""
    if what == "rmse":
        ma, mb = a["_mse"], b["_mse"]
        diff = a["rmse"] - b["rmse"]
        ci = boot_ci(lambda i: np.sqrt(ma[i].mean()) - np.sqrt(mb[i].mean()), len(ma), reps, 1)
    else:  # "fid" (against real data) or "fid_converged": `reference` is the matching one
        fa, fb, mu, sg = a["_feats"], b["_feats"], reference.mu, reference.sigma
        fid = lambda f: fid_from_stats(*feature_stats(f), mu, sg)  # noqa: E731
        diff = a[what] - b[what]
        ci = boot_ci(lambda i: fid(fa[i]) - fid(fb[i]), len(fa), reps, 2)
    return {"ours": a["method"], "peer": b["method"], "diff": diff, "ci95": ci, "win": ci[1] < 0}


METRICS = ("rmse", "fid", "fid_converged")  # the last only when the reference covers all n


def verdicts(
    rows: list[dict], nfes: list[int], reference, converged: ReferenceStats | None = None
) -> dict:
    refs = {"rmse": None, "fid": reference, "fid_converged": converged}
    out: dict = {}
    for k in nfes:
        here = [r for r in rows if r["nfe"] == k]
        ours = [r for r in here if r["family"] == "difforge"]
        out[str(k)] = {}
        for what in METRICS:
            if not ours or what not in ours[0]:
                continue
            best = min(ours, key=lambda r: r[what])
            for group in sorted(set(PEER_GROUP.values())):
                peers = [r for r in here if PEER_GROUP.get(r["family"]) == group]
                if peers:
                    peer = min(peers, key=lambda r: r[what])
                    reps = 1000 if what == "rmse" else 200
                    out[str(k)][f"{what} vs {group}"] = compare(best, peer, what, refs[what], reps)
    return out


def summarize(rows: list[dict], verdict: dict, args) -> str:
    n_rmse = rows[0].get("n_rmse", 0)
    parts = [f"n={args.n} (FID/KID/acc), n={n_rmse} (RMSE), seeds from {args.seed}, guidance "
             f"{args.guidance:g}, ref {args.ref}"]  # fmt: skip
    for k, vs in verdict.items():
        cells = []
        for key, v in vs.items():
            lo, hi = v["ci95"]
            cells.append(f"{key}: {v['ours']} - {v['peer']} = {v['diff']:+.4g} [{lo:+.3g}, "
                         f"{hi:+.3g}] {'WIN' if v['win'] else 'no win'}")  # fmt: skip
        parts.append(f"@{k} NFE " + "; ".join(cells))
    needed = {f"{w} vs {g}" for w in ("rmse", "fid") for g in set(PEER_GROUP.values())}
    judged = all(needed <= set(vs) for vs in verdict.values())
    met = judged and all(
        v["win"] for vs in verdict.values() for key, v in vs.items() if key in needed
    )
    word = "MET" if met else "NOT met" if judged else "not judged (a comparison is missing)"
    big = " (at n >= 1000)" if args.n >= 1000 and n_rmse >= 1000 else f" (here at n={args.n})"
    parts.append(f"target (a win at every NFE in RMSE and FID vs both peer groups){big}: {word}")
    return ". ".join(parts)


def verdict_table(rows: list[dict], verdict: dict) -> str:
    """Markdown: per NFE, each family's best RMSE and FID (95% CI), and the paired verdicts."""
    fam = {"difforge": "difforge", **PEER_GROUP}
    groups = ["difforge", *sorted(set(PEER_GROUP.values()))]
    head = "| NFE | metric | " + " | ".join(f"best {g}" for g in groups) + " | difforge wins |"
    out = [head, "|" + "---|" * (len(groups) + 3)]
    for k, vs in verdict.items():
        for what in METRICS:
            if not any(key.startswith(f"{what} vs") for key in vs):
                continue
            cells = []
            for g in groups:
                here = [
                    r for r in rows if r["nfe"] == int(k) and fam[r["family"]] == g and what in r
                ]
                if not here:
                    cells.append("-")
                    continue
                b = min(here, key=lambda r: r[what])
                ci = (
                    f" [{b['rmse_ci95'][0]:.3f}, {b['rmse_ci95'][1]:.3f}]" if what == "rmse" else ""
                )
                cells.append(f"{b['method']} {b[what]:.3f}{ci}" if what == "rmse"
                             else f"{b['method']} {b[what]:.1f}")  # fmt: skip
            wins = [f"vs {key.split(' vs ')[1]}: {'yes' if v['win'] else 'no'} ({v['diff']:+.3g} "
                    f"[{v['ci95'][0]:+.3g}, {v['ci95'][1]:+.3g}])"
                    for key, v in vs.items() if key.startswith(f"{what} vs")]  # fmt: skip
            out.append(f"| {k} | {what.upper()} | " + " | ".join(cells) + f" | {'; '.join(wins)} |")
    return "\n".join(out)


def check_reference(args, model, methods, log) -> dict:
    """The reference against Heun with 4x the steps (both grids), on the first --check-ref images:
    their RMSE bounds the reference's own error."""
    solver, steps = args.ref.split(":")
    anchors = start_sigmas(methods)
    seeds = list(range(args.seed, args.seed + args.check_ref))
    labels = [i % model.num_classes for i in seeds]
    z = PerSampleNoise(seeds).draw(model.image_shape)
    err = lambda u, v: (u.double() - v.double()).pow(2).mean().sqrt().item()  # noqa: E731
    runs = {}
    for name, n_steps, top in ((solver, int(steps), 8), ("heun", 4 * int(steps), 32)):
        upper, lower = reference_grids(model, n_steps, anchors, top)
        st = starts(model, name, upper, z, labels, args.guidance)
        x_max = st[nearest(model.process.sigma_max, list(st))]
        runs[name] = (st, solve(model, name, lower, x_max, labels, args.guidance))
    (sa, fa), (sb, fb) = runs[solver], runs["heun"]
    res = {"images": len(seeds), "ref": args.ref, "against": f"heun:{4 * int(steps)}, 32 steps above",
           "final_rmse": err(fa, fb),
           "start_rmse": {f"{a:g}": err(sa[nearest(a, list(sa))], sb[nearest(a, list(sb))])
                          for a in anchors}}  # fmt: skip
    log(f"reference check: {res}")
    return res


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/mnist-cond")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfe", default="4,5,6,8,10")
    ap.add_argument("--guidance", type=float, default=2.0)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--ref", default="deis:60", help="SOLVER:STEPS of the reference [deis:60]")
    ap.add_argument("--ref-n", type=int, default=10**9, help="reference (RMSE) on the first seeds")
    ap.add_argument("--check-ref", type=int, default=0, help="check the reference on M images")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cached-only", action="store_true")
    ap.add_argument("--name", default="solver_quality", help="results/<name>.json")
    ap.add_argument("--note", default="")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    model = load(args.model)
    methods = []
    for spec in args.methods.split(","):
        m = Method(spec, model)
        if m.family in ("kdiff", "comfy") and peer_module(m.family) is None:
            log(f"skipped {spec}: {m.family} not found under {PEERS}")
            continue
        methods.append(m)
    nfes = [int(v) for v in args.nfe.split(",")]
    start = time.perf_counter()
    check = check_reference(args, model, methods, log) if args.check_ref else None
    images = draw(args, model, methods, nfes, log)
    extractor = load_feature_extractor()
    reference = default_reference("train", extractor)
    rows = score(images, methods, nfes, args, (extractor, reference))
    converged, converged_stats = score_reference(
        images, args, (extractor, reference), model.num_classes
    )
    if converged_stats is not None:
        add_fid_to_converged(rows, converged_stats)
    verdict = verdicts(rows, nfes, reference, converged_stats)
    summary = summarize(rows, verdict, args)
    if converged is not None:
        summary += (f". The reference itself (the converged solution, n={converged['n']}): FID "
                    f"{converged['fid']:.2f}, KID {converged['kid']:.1f}, acc {converged['acc']:.3f}")  # fmt: skip
    for r in rows:
        print(f"{r['nfe']:3d} {r['method']:34s} rmse {r['rmse']:.4f} [{r['rmse_ci95'][0]:.4f}, "
              f"{r['rmse_ci95'][1]:.4f}] fid {r.get('fid', float('nan')):7.2f} "
              f"kid {r.get('kid', float('nan')):7.1f} acc {r.get('acc', float('nan')):.3f} "
              f"fid to converged {r.get('fid_converged', float('nan')):6.2f}")  # fmt: skip
    payload = {"model": model.name, "model_sha256": model.sha256, "n": args.n, "seed": args.seed,
               "guidance": args.guidance, "nfe": nfes, "reference": args.ref, "n_rmse": rows[0].get("n_rmse"),
               "reference_check": check, "reference_scores": converged, "start_sigma_diffusers": SIGMA_T,
               "rows": [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows],
               "verdicts": verdict, "note": args.note, "seconds": time.perf_counter() - start}  # fmt: skip
    out = write_result(args.name, payload, summary + (f". {args.note}" if args.note else ""))
    print(summary)
    print(verdict_table(rows, verdict))
    print("wrote", out.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
