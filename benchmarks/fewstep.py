"""Few-step generation: the teacher at 50 and 20 steps against distilled students at 1/2/4 steps.

    python -m benchmarks.fewstep [--teacher models/mnist-cond] [--n 1000] [--seed 0]
        [--student PATH[:STEPS][@GRID]] ... [--threads 1] [--batch 100] [--fresh]
        [--context-guidance 2,1] [--name fewstep]

Every method draws the same n images: image i has seed `seed + i` and label i mod 10, at the
teacher's guidance (3.0) unless a student says otherwise. For each it records FID and KID in
difforge's feature space (`models/mnist-features`, against MNIST train), label accuracy judged by
the same network's classifier head (no student is trained with it: difforge.training.distill uses
only the teacher's outputs, so the classifier is independent of the students), NFE (sampler
steps), network forwards per image (2 per step for the classifier-free-guided teacher, 1 for a
guidance-distilled student) and CPU wall ms/image on --threads threads.

A method's images are drawn in chunks of --batch seeds, cached under benchmarks/results/fewstep/
(keyed by model sha256, sampler, steps, guidance, n and seed) with its result, so students can be
added to a run without redrawing the teacher, and several processes running the same command
share the chunks (each claims a chunk before drawing it); a method is reported once all its chunks
are drawn. --fresh recomputes the metrics; --cached-only draws nothing. A --student given as such
a record (results/fewstep/KEY.json) is judged from it, so a student folder that is gone (runs/ is
not kept) still counts, at the n and seeds it was measured with. --context-guidance W
also measures the teacher at its default steps and guidance W (same seeds): context for reading a
student's FID (a less guided student has a lower FID), never used in the verdicts.

Targets (issue #14), reported met or not with the numbers:
  (1) a 4-step student's FID within 1.3x of the teacher's 50-step FID;
  (2) a 1-step student with label accuracy >= 0.98;
  (3) the guidance-distilled student at the teacher's default steps: half the forwards per image
      of the guided teacher at the same steps and label accuracy at least the teacher's (equal
      within the binomial standard error at this n).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, write_result
from difforge.evaluation import evaluate_images, load_feature_extractor
from difforge.evaluation.against import default_reference
from difforge.evaluation.features import extract
from difforge.evaluation.metrics import feature_stats, fid_from_stats
from difforge.pipeline import Model, load

ROOT = Path(__file__).resolve().parent.parent
CACHE = RESULTS_DIR / "fewstep"


def forwards_per_step(model: Model, guidance: float) -> int:
    """Network forwards per sampler evaluation: CFG runs cond and null halves."""
    return 1 if model.guidance_input or guidance == 1.0 else 2


def _chunk(model: Model, method: tuple, seeds: range) -> dict:
    """One chunk of images (seed i has label i mod 10), its NFE and its wall seconds."""
    sampler, steps, guidance, grid = method
    labels = [i % 10 for i in seeds]
    start = time.perf_counter()
    out = model.sample(
        labels=labels, seeds=list(seeds), sampler=sampler, steps=steps, guidance=guidance,
        grid=grid,
    )  # fmt: skip
    return {"images": out.images, "labels": torch.tensor(labels), "nfe": out.nfe,
            "seconds": time.perf_counter() - start}  # fmt: skip


def _draw_chunks(model: Model, key: str, method: tuple, args):
    """Draw every chunk not drawn or claimed yet; several processes running the same command
    share the work (a chunk is claimed by creating its .claim file). Returns the chunk files."""
    folder = CACHE / key
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for lo in range(args.seed, args.seed + args.n, args.batch):
        seeds = range(lo, min(args.seed + args.n, lo + args.batch))
        path = folder / f"chunk-{lo}.pt"
        files.append(path)
        if path.exists() or args.cached_only:
            continue
        try:
            os.close(os.open(folder / f"chunk-{lo}.claim", os.O_CREAT | os.O_EXCL))
        except FileExistsError:
            continue  # another process draws it
        torch.save(_chunk(model, method, seeds), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return files


def measure(
    model: Model, path: str, sampler: str, steps: int, guidance: float, args, against,
    grid: str = "karras",
) -> dict | None:  # fmt: skip
    """One method's record (cached), or None while some of its chunks are not drawn yet."""
    key = record_key(model.sha256, sampler, steps, grid, guidance, args.n, args.seed)
    cached, feats = CACHE / f"{key}.json", CACHE / f"{key}.feats.npy"
    if cached.exists() and not args.fresh and (feats.exists() or args.cached_only):
        return json.loads(cached.read_text())
    files = _draw_chunks(model, key, (sampler, steps, guidance, grid), args)
    if not all(f.exists() for f in files):
        print(f"not complete yet: {model.name} {sampler}-{steps}")
        return None
    chunks = [torch.load(f) for f in files]
    images = torch.cat([c["images"] for c in chunks])
    labels = torch.cat([c["labels"] for c in chunks])
    extractor, reference = against
    ev = evaluate_images(images, labels, extractor, reference, seed=args.seed)
    np.save(feats, extract(extractor.features, images).astype(np.float32))  # for fid_to_teacher
    m, nfe = ev["metrics"], chunks[0]["nfe"]
    rec = {
        "model": path, "name": model.name, "sha256": model.sha256, "sampler": sampler,
        "grid": grid, "steps": steps, "guidance": guidance, "n": args.n, "seed": args.seed, "nfe": nfe,
        "forwards_per_image": nfe * forwards_per_step(model, guidance),
        "ms_per_image": 1000 * sum(c["seconds"] for c in chunks) / args.n,
        "fid": m["fid"], "kid": m["kid_mean"], "label_accuracy": m["label_accuracy"],
        "threads": torch.get_num_threads(), "batch": args.batch,
        "extractor": ev["extractor"], "reference": ev["reference"],
    }  # fmt: skip
    cached.write_text(json.dumps(rec, indent=2) + "\n")
    return rec


def add_fid_to_teacher(teacher50: dict | None, records: list[dict]) -> None:
    """Each record's Frechet distance to the 50-step teacher's own images (same seeds, labels and
    features): how close a student's distribution is to its teacher's. Real-data FID is not that
    measure: a less guided student scores a lower FID than its teacher (see the README)."""
    path = teacher50 and CACHE / f"{_key(teacher50)}.feats.npy"
    if path is None or not path.exists():
        return
    mu, sigma = feature_stats(np.load(path).astype(np.float64))
    for r in records:
        f = CACHE / f"{_key(r)}.feats.npy"
        if f.exists():
            r["fid_to_teacher50"] = fid_from_stats(*feature_stats(np.load(f).astype(np.float64)),
                                                   mu, sigma)  # fmt: skip


def _key(r: dict) -> str:
    return record_key(r["sha256"], r["sampler"], r["steps"], r.get("grid"), r["guidance"],
                      r["n"], r["seed"])  # fmt: skip


def grid_suffix(grid: str | None) -> str:
    """ "@GRID" in keys and rows; none for karras or None (a record from before grids were
    recorded: all karras), so those keys and records stay valid."""
    return "" if grid in (None, "karras") else f"@{grid}"


def record_key(sha256, sampler, steps, grid, guidance, n, seed) -> str:
    """A method's cache key."""
    return f"{sha256[:16]}-{sampler}-{steps}{grid_suffix(grid)}-w{guidance}-n{n}-s{seed}"


def cached_record(path: str, args) -> dict:
    """A method's record written by `measure` (its images need not exist any more: it names the
    model's sha256), refused unless it has this run's n and seed."""
    rec = json.loads(Path(path).read_text())
    if (rec["n"], rec["seed"]) != (args.n, args.seed):
        raise SystemExit(f"{path}: n={rec['n']}, seed={rec['seed']}, not {args.n}, {args.seed}")
    return rec


def verdicts(teacher50: dict | None, teacher20: dict | None, students: list[dict]) -> dict:
    """The three targets, each with the numbers it was judged on ("met": None when the teacher
    point it needs was not measured)."""
    out: dict[str, Any] = {}
    four = [s for s in students if s["steps"] == 4]
    if four:
        best = min(four, key=lambda s: s["fid"])
        v: dict[str, Any] = {"met": None, "student_fid": best["fid"], "student": best["name"]}
        if teacher50 is not None:
            v |= {"ratio": best["fid"] / teacher50["fid"], "teacher50_fid": teacher50["fid"]}
            v["met"] = v["ratio"] <= 1.3
        if teacher20 is not None:  # context only: the target is against 50 steps
            v["ratio_to_teacher20"] = best["fid"] / teacher20["fid"]
        out["fid_4step_within_1.3x_of_teacher50"] = v
    one = [s for s in students if s["steps"] == 1]
    if one:
        best = max(one, key=lambda s: s["label_accuracy"])
        out["acc_1step_ge_0.98"] = {
            "met": best["label_accuracy"] >= 0.98, "acc": best["label_accuracy"],
            "student": best["name"],
        }  # fmt: skip
    guided = [s for s in students if teacher20 and s["steps"] == teacher20["steps"]]
    if guided:
        g = max(guided, key=lambda s: s["label_accuracy"])
        a, b, n = g["label_accuracy"], teacher20["label_accuracy"], teacher20["n"]
        se = math.sqrt(max(b * (1 - b), 1.0 / n) / n)  # binomial standard error at the teacher's
        out["guidance_half_nfe_equal_acc"] = {
            "met": 2 * g["forwards_per_image"] <= teacher20["forwards_per_image"] and a >= b - se,
            "student_acc": a, "teacher_acc": b, "stderr": se,
            "student_forwards": g["forwards_per_image"],
            "teacher_forwards": teacher20["forwards_per_image"],
        }  # fmt: skip
    return out


def _row(r: dict) -> str:
    return (
        f"{r['name']} {r['sampler']}-{r['steps']}{grid_suffix(r.get('grid'))}: FID {r['fid']:.2f}, acc {r['label_accuracy']:.3f}"
        + (f" (to teacher-50 {r['fid_to_teacher50']:.2f})" if "fid_to_teacher50" in r else "")
        + f", {r['forwards_per_image']} fwd, {r['ms_per_image']:.1f} ms"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="models/mnist-cond")
    p.add_argument(
        "--student", action="append", default=[],
        help="PATH[:STEPS[,STEPS...]][@GRID] (default: the student's steps and grid), or a "
        "record results/fewstep/KEY.json measured before",
    )  # fmt: skip
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--teacher-steps", default="50,20")
    p.add_argument("--context-guidance", default="", help="teacher at these w too (context)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--cached-only", action="store_true", help="report only methods measured before")
    p.add_argument("--name", default="fewstep", help="results/NAME.json and the row's benchmark")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    extractor = load_feature_extractor()
    against = (extractor, default_reference("train", extractor))
    teacher = load(args.teacher)
    ts = teacher.sampling
    t_recs = [
        measure(teacher, args.teacher, ts.sampler, int(k), ts.guidance, args, against)
        for k in args.teacher_steps.split(",")
        if k != "none"  # "none": students only (e.g. a second process while the teacher runs)
    ]
    t_recs = [r for r in t_recs if r is not None]
    c_recs = [
        measure(teacher, args.teacher, ts.sampler, ts.steps, float(w), args, against)
        for w in args.context_guidance.split(",")
        if w
    ]
    c_recs = [r for r in c_recs if r is not None]
    s_recs = []
    for spec in args.student:
        if spec.endswith(".json"):  # a student measured before, by its cached record
            s_recs.append(cached_record(spec, args))
            continue
        spec, _, grid = spec.partition("@")
        path, _, steps = spec.partition(":")
        student = load(path)
        ss = student.sampling
        for k in steps.split(",") if steps else [str(ss.steps)]:
            rec = measure(
                student, path, ss.sampler, int(k), ss.guidance, args, against, grid or ss.grid
            )
            s_recs.append(rec)
    if not t_recs and not args.cached_only:
        print(json.dumps(s_recs, indent=2))
        return
    s_recs = [r for r in s_recs if r is not None]
    by_steps = {r["steps"]: r for r in t_recs}
    add_fid_to_teacher(by_steps.get(50), t_recs + s_recs + c_recs)
    verdict = verdicts(by_steps.get(50), by_steps.get(ts.steps), s_recs)
    payload = {"n": args.n, "seed": args.seed, "teacher": t_recs, "students": s_recs}
    payload["targets"] = verdict
    payload["context"] = c_recs  # the teacher at other guidance scales: not judged
    word = {True: "MET", False: "NOT met", None: "not judged (teacher point not measured)"}
    marks = "; ".join(f"{k} {word[v['met']]}" for k, v in verdict.items())
    summary = f"n={args.n}, seeds {args.seed}..{args.seed + args.n - 1}, labels i mod 10: "
    summary += "; ".join(_row(r) for r in t_recs + s_recs) + f". Targets: {marks}"
    if c_recs:
        summary += ". Context (teacher): " + "; ".join(
            f"w={r['guidance']} {_row(r)}" for r in c_recs
        )
    out = write_result(args.name, payload, summary)
    print(summary)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
