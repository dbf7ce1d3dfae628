"""Time to quality on MNIST: difforge's recipe vs a diffusers `train_unconditional`-style recipe.

The budget is training work: difforge trains to each of `--steps` (batch 64, so 600 steps = 38,400
images) and the wall-clock it took is reported beside it, since this shared machine's speed drifts
from day to day. The diffusers recipe then trains for the same wall-clock as difforge took to each
point (equal time) and for the same number of steps (equal training work), from one run of its loop:
each of its snapshots is taken when the loop first reaches that point, so the run costs the longer of
the two (`--diffusers-budget steps|time` keeps one). `--minutes` keeps the older equal-minutes
budget instead. Every point reports its wall-clock, training images/s and the 1-minute load average
when it was reached. Both are scored by the same evaluation (difforge's MNIST feature network:
FID-MNIST, KID and label accuracy against the test split), on the same number of class-balanced
samples.

  difforge:  `--config` (default configs/mnist.json: EDM preconditioning and loss weighting,
             log-normal sigmas, 10% label dropout, EMA, lr 1e-3; configs/mnist-short-run.json is the
             short-run recipe), sampled at mnist-cond's defaults (dpmpp_2m, 20 steps, guidance 3).
  diffusers: UNet2DModel of about the same parameter count with class embeddings, eps loss on the
             DDPM linear schedule, AdamW lr 1e-4, EMA (diffusers' EMAModel), sampled with
             DPMSolverMultistepScheduler, 20 steps (no null class, so no guidance).

Training throughput (images/s at batch 64) is measured separately, alternating short bursts of
both recipes so that machine drift hits both equally.

    python -m benchmarks.time_to_quality [--steps 600,1200 | --minutes 20] [--n 1000]
        [--config configs/mnist.json] [--threads 2] [--no-diffusers] [--quick]
        [--diffusers-budget both|steps|time]

Scoring is not timed. The report adds the train-vs-test floor: FID of n real training images at
the same n, and the 1-minute load average before and after training.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import write_result
from benchmarks.quality_vs_nfe import real_data_floor
from benchmarks.sampler_overhead import build_unet
from difforge.data.mnist import load_mnist
from difforge.evaluation import load_feature_extractor, mnist_reference
from difforge.evaluation.evaluate import evaluate_images
from difforge.training import load_config, train

ROOT = Path(__file__).resolve().parent.parent
BATCH = 64


class DiffusersRecipe:
    """The diffusers example loop: eps loss at uniform timesteps, AdamW, EMA."""

    def __init__(self, seed: int = 0):
        from diffusers import DDPMScheduler
        from diffusers.training_utils import EMAModel

        torch.manual_seed(seed)
        self.unet = build_unet(num_class_embeds=10).train()
        self.sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
        self.opt = torch.optim.AdamW(self.unet.parameters(), lr=1e-4, weight_decay=1e-6)
        self.ema = EMAModel(self.unet.parameters(), decay=0.9999, use_ema_warmup=True, power=0.75)
        data = load_mnist("train")
        self.images, self.labels = data.as_float(), data.labels
        self.gen = torch.Generator().manual_seed(seed)

    def step(self) -> float:
        idx = torch.randint(0, self.images.shape[0], (BATCH,), generator=self.gen)
        x0, y = self.images[idx], self.labels[idx]
        noise = torch.randn(x0.shape, generator=self.gen)
        t = torch.randint(0, 1000, (BATCH,), generator=self.gen)
        pred = self.unet(self.sched.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred, noise)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.unet.parameters(), 1.0)
        self.opt.step()
        self.ema.step(self.unet.parameters())
        return loss.item()

    def ema_net(self) -> torch.nn.Module:
        """A frozen copy of the network carrying the EMA weights (training may go on)."""
        net = copy.deepcopy(self.unet).eval()
        self.ema.copy_to(net.parameters())
        return net


@torch.no_grad()
def sample_diffusers(net, labels: list[int], seed: int, steps: int = 20) -> torch.Tensor:
    from diffusers import DPMSolverMultistepScheduler

    sched = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="linear")
    out = []
    for start in range(0, len(labels), 256):
        y = torch.tensor(labels[start : start + 256])
        gen = torch.Generator().manual_seed(seed + start)
        x = torch.randn((len(y), 1, 28, 28), generator=gen)
        sched.set_timesteps(steps)
        for t in sched.timesteps:
            x = sched.step(net(x, t, class_labels=y).sample, t, x).prev_sample
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(out)


def throughput(config: Path, rounds: int, burst: int) -> dict:
    """Images/s of one training step at batch 64, difforge vs diffusers, alternating bursts."""
    from difforge.training import Trainer

    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        ours = Trainer(cfg, load_mnist("train"), Path(tmp), log=lambda _: None)
        theirs = DiffusersRecipe()
        rates: dict[str, list[float]] = {"difforge": [], "diffusers": []}
        for r in range(rounds + 1):  # round 0 warms up
            for name in ("difforge", "diffusers") if r % 2 else ("diffusers", "difforge"):
                t0 = time.perf_counter()
                for _ in range(burst):
                    if name == "difforge":
                        ours.train_step(*ours.next_batch())
                    else:
                        theirs.step()
                if r > 0:
                    rates[name].append(burst * BATCH / (time.perf_counter() - t0))
        params = {
            "difforge": sum(p.numel() for p in ours.net.parameters()),
            "diffusers": sum(p.numel() for p in theirs.unet.parameters()),
        }
    return {k: statistics.median(v) for k, v in rates.items()} | {"params": params}


def score(images: torch.Tensor, labels: list[int], extractor, reference) -> dict:
    rep = evaluate_images(images, torch.tensor(labels), extractor, reference)
    m = rep["metrics"]
    return {k: m.get(k) for k in ("fid", "kid_mean", "label_accuracy", "precision", "recall")}


def train_difforge(config: Path, budgets: list[dict], keep: Path) -> list[dict]:
    """Train `config` to each budget in turn (resuming), keeping each exported model.

    A budget is {"steps": N} (stop after step N) or {"minutes": M} (M more minutes). Sample grids
    during training are off (the diffusers loop draws none either); everything else that the
    recipe does, checkpoints included, counts against the wall-clock."""
    cfg = load_config(config).model_copy(update={"sample_every": 0})
    runs, steps_seconds = [], 0.0
    for i, budget in enumerate(budgets):
        res = train(
            cfg,
            keep / "run",
            resume=i > 0,
            max_minutes=budget.get("minutes"),
            until_step=budget.get("steps"),
            progress=False,
        )
        steps_seconds += res.seconds
        shutil.copytree(res.model_dir, keep / f"model-{i}")
        load = os.getloadavg()[0]
        runs.append({"dir": keep / f"model-{i}", "steps": res.step, "seconds": steps_seconds})
        runs[-1]["load"] = load
    return runs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    budget = ap.add_mutually_exclusive_group()
    budget.add_argument(
        "--steps", default="600,1200", help="comma-separated step budgets (batch 64), scored each"
    )
    budget.add_argument(
        "--minutes", type=float, default=None, help="equal-minutes budget instead: half and full"
    )
    ap.add_argument("--n", type=int, default=1000, help="samples scored per checkpoint")
    ap.add_argument("--config", default="configs/mnist.json", help="difforge training recipe")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both recipes")
    ap.add_argument("--no-diffusers", action="store_true", help="score difforge's recipe only")
    ap.add_argument(
        "--diffusers-budget",
        choices=("both", "steps", "time"),
        default="both",
        help="train the diffusers recipe to difforge's steps (equal training work), to its "
        "wall-clock (equal time), or both from one run (default)",
    )
    ap.add_argument("--quick", action="store_true", help="steps 20,40 and n=300: checks it runs")
    args = ap.parse_args(argv)
    if args.quick:
        args.steps, args.minutes, args.n = "20,40", None, 300
    if args.minutes is not None:
        args.budgets = [{"minutes": args.minutes / 2}] * 2  # scored at half and at the end
    else:
        try:
            steps = [int(s) for s in args.steps.split(",")]
        except ValueError:
            ap.error(f"--steps: expected comma-separated integers, got {args.steps!r}")
        if not steps or steps != sorted(set(steps)) or steps[0] < 1:
            ap.error(f"--steps: expected increasing positive integers, got {args.steps!r}")
        args.budgets = [{"steps": s} for s in steps]
    return args


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    labels = [i % 10 for i in range(args.n)]
    config = ROOT / args.config
    rate = throughput(config, rounds=2 if args.quick else 5, burst=3 if args.quick else 10)
    results: dict[str, list[dict]] = {"difforge": [], "diffusers": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # Both recipes train first, back to back; scoring (not timed) comes after.
        runs = train_difforge(config, args.budgets, Path(tmp))
        load_difforge = os.getloadavg()[0]
        theirs = (
            []
            if args.no_diffusers
            else train_diffusers_matched(DiffusersRecipe(), runs, args.diffusers_budget)
        )
        load_after = os.getloadavg()[0]
        import difforge

        extractor = load_feature_extractor()
        reference = mnist_reference("test", extractor)
        for run in runs:
            model = difforge.load(run["dir"])  # mnist-cond's defaults, whatever the recipe says
            imgs = model.sample(labels=labels, sampler="dpmpp_2m", steps=20, guidance=3.0, seed=0)
            point = point_of(run)
            results["difforge"].append(point | score(imgs.images, labels, extractor, reference))
        for run in theirs:
            images = sample_diffusers(run["net"], labels, 0)
            results["diffusers"].append(point_of(run) | score(images, labels, extractor, reference))
    floor = real_data_floor(args.n, extractor, reference)
    load = {"before": load_before, "after_difforge": load_difforge, "after": load_after}
    summary = summarize(args, results, rate, floor, load)
    write_result(
        result_name(args),
        {
            "budgets": args.budgets,
            "config": args.config,
            "threads": args.threads,
            "n": args.n,
            "diffusers_budget": None if args.no_diffusers else args.diffusers_budget,
            "results": results,
            "throughput": rate,
            "load_1min": load,
            "floor_train_vs_test": floor,
        },
        summary,
    )
    print(summary)


def result_name(args: argparse.Namespace) -> str:
    """time_to_quality[_<config stem> unless the default][_steps<budgets> unless the default]
    [_quick]: one JSON per recipe and budget, so a shorter run does not overwrite a longer one."""
    stem = Path(args.config).stem
    steps = [b["steps"] for b in args.budgets if "steps" in b]
    suffix = (
        "" if args.quick or steps in ([], [600, 1200]) else "_steps" + "-".join(map(str, steps))
    )
    return (
        "time_to_quality"
        + ("" if stem == "mnist" else f"_{stem}")
        + suffix
        + ("_quick" * args.quick)
    )


def diffusers_targets(runs: list[dict], budget: str) -> list[dict]:
    """The points the diffusers recipe is snapshot at: difforge's steps and/or its wall-clock."""
    targets = []
    for run in runs:
        if budget in ("both", "steps"):
            targets.append({"budget": "equal steps", "steps": run["steps"]})
        if budget in ("both", "time"):
            targets.append({"budget": "equal time", "seconds": run["seconds"]})
    return targets


def train_diffusers_matched(
    recipe, runs: list[dict], budget: str = "both", clock=time.perf_counter, load=None
) -> list[dict]:
    """Train one diffusers run, snapshotting its EMA net as it first reaches each target.

    A step target is reached after that many steps, a time target after the first step that ends
    at or past that many seconds of training (snapshot time is not counted). The run stops when
    every target is reached, so `both` costs the longer of the two budgets, not their sum."""
    load = load or (lambda: os.getloadavg()[0])
    pending = diffusers_targets(runs, budget)
    points: list[dict] = []
    steps, elapsed = 0, 0.0
    while pending:
        t0 = clock()
        recipe.step()
        elapsed += clock() - t0
        steps += 1
        reached = [
            t
            for t in pending
            if steps >= t.get("steps", float("inf")) or elapsed >= t.get("seconds", float("inf"))
        ]
        for target in reached:
            pending.remove(target)
            points.append(
                {
                    "budget": target["budget"],
                    "net": recipe.ema_net(),
                    "steps": steps,
                    "seconds": elapsed,
                    "load": load(),
                }
            )
    return points


def point_of(run: dict) -> dict:
    """steps, images, minutes and training images/s of a point (and its budget and load if set)."""
    images = run["steps"] * BATCH
    point = {"steps": run["steps"], "images": images, "minutes": run["seconds"] / 60}
    point["img_per_s"] = images / run["seconds"] if run["seconds"] > 0 else None
    return point | {k: run[k] for k in ("budget", "load") if k in run}


def summarize(args, results: dict, rate: dict, floor: dict, load: dict) -> str:
    def fmt(p: dict) -> str:
        extra = [f"{p['img_per_s']:.1f} img/s"] if p.get("img_per_s") else []
        extra += [f"load {p['load']:.1f}"] if p.get("load") is not None else []
        return (
            f"{p['steps']} steps ({p['images']:,} images)/{p['minutes']:.1f} min"
            + (f" ({', '.join(extra)})" if extra else "")
            + f": FID {p['fid']:.1f}, acc {100 * p['label_accuracy']:.1f}%"
        )

    def target(steps: int, acc: float) -> str:
        # the first point at or just past `steps` (--minutes budgets land near it); a much
        # later point is not a measurement at `steps`
        hit = [p for p in results["difforge"] if steps <= p["steps"] < 1.5 * steps]
        if not hit:
            return f"acc>={100 * acc:.0f}% at {steps} steps not measured"
        got = hit[0]["label_accuracy"]
        return f"acc>={100 * acc:.0f}% at {steps} steps {'met' if got >= acc else 'NOT met'}"

    d, p = results["difforge"], results["diffusers"]
    checks = [target(600, 0.98), target(1200, 0.99)]
    if p:
        same = [x for x in p if x.get("budget") == "equal steps" and x["steps"] == d[-1]["steps"]]
        versus = same[-1] if same else p[-1]
        met = d[-1]["fid"] <= versus["fid"] / 2
        label = versus.get("budget", "equal time")
        checks.append(f"FID<=half of diffusers' ({label}) {'met' if met else 'NOT met'}")
    theirs = ""
    for budget in dict.fromkeys(x.get("budget", "equal time") for x in p):
        group = [x for x in p if x.get("budget", "equal time") == budget]
        theirs += f" | diffusers ({budget}) " + "; ".join(fmt(x) for x in group)
    after = f"{load['after_difforge']:.1f}->" if "after_difforge" in load else ""
    return (
        f"n={args.n}, {args.config}, {args.threads} threads, load {load['before']:.1f}->"
        f"{after}{load['after']:.1f}, guidance 3 (difforge) / none (diffusers); difforge "
        + "; ".join(fmt(x) for x in d)
        + theirs
        + f" | floor FID {floor['fid']:.1f} | targets: {', '.join(checks)} | train throughput "
        f"{rate['difforge']:.1f} vs {rate['diffusers']:.1f} img/s at batch {BATCH} "
        f"({rate['params']['difforge'] / 1e6:.2f}M vs {rate['params']['diffusers'] / 1e6:.2f}M params)"
    )


if __name__ == "__main__":
    main()
