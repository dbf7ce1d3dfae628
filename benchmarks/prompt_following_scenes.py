"""Prompt following on the 64x64 MNIST scenes: the fraction of images whose every stated fact holds.

The scenes sibling of benchmarks/prompt_following.py (its sampling loop, `score`, is shared). A
fixed prompt set (difforge.data.scene_captions.prompt_set) is phrased from clauses, in categories:
  digit               one digit, position open, seen phrasings ("a 7", "the digit seven")
  position            one digit at a stated quadrant, seen phrasings ("a 7 in the top left")
  position_held_out   the same facts, the held-out position phrasing ("... in the upper-left corner")
  two_digits          two different digits, each at a stated quadrant
  count               two copies of a digit, positions open ("two sevens", "a pair of 7s")
  count_held_out      the held-out count phrasing ("two of the number 7")
  thickness           digit + quadrant + "thick"/"thin"
  size                digit + quadrant + "large"/"small" (the ink's height, as captioned)
  combo_held_out      a (digit, quadrant) pair no training caption states (HELD_OUT_COMBOS),
                      in seen phrasings
An image passes when every fact holds, judged by difforge.evaluation.scenes.judge_clauses: the
MNIST classifier per quadrant (predict_slots), the ink measurements of the captions for
thickness, and every quadrant no clause accounts for must be empty (the captions' rule).

Each text model (`--model NAME=PATH`) runs at every `--guidance`; a class-conditional slot model
(`--slot-model`, default models/scenes-latent) runs on the same prompts where both apply: each
prompt's clauses become the slots it takes (`clause_slots`; open copies in the first free
quadrants), every category but thickness and size (a slot model has no input for them). The slot
model saw every (digit, quadrant) pair in training, so on combo_held_out it is a reference, not a
like-for-like generalisation test. A text model with a layout stage (difforge.pipeline.layout)
can also run as `--oracle NAME=PATH`: its prompt with the slot model's layout in place of its
planner's draw, which scores the image stage alone. The judge's ceiling: real test scenes judged against their own
(seen-phrasing) captions.

    python -m benchmarks.prompt_following_scenes --model unet=runs/scenes-text-unet/model \\
        --model dit=runs/scenes-text-dit/model --per-prompt 4 --guidance 1,2,4 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import write_result
from benchmarks.prompt_following import score
from difforge.data.scene_captions import (
    CATEGORIES,
    HELD_OUT_COMBOS,
    SLOT_CATEGORIES,
    clause_slots,
    prompt_set,
)


def real_ceiling(extractor, n: int = 2000) -> dict:
    """The judge on real test scenes with their own captions (seen phrasings)."""
    from difforge.data.scene_captions import load_scene_captions
    from difforge.evaluation.scenes import judge_clauses

    test = load_scene_captions("test", limit=n)
    ok = judge_clauses(extractor, test.images, list(test.clauses), test.scene_thresholds)
    by_digits: dict[int, list[bool]] = {}
    for good, slots in zip(ok, test.slots.tolist(), strict=True):
        by_digits.setdefault(sum(s != 10 for s in slots), []).append(good)
    return {
        "fraction": sum(ok) / len(ok),
        "n": len(ok),
        "by_digits": {
            k: {"fraction": sum(v) / len(v), "n": len(v)} for k, v in sorted(by_digits.items())
        },
        "captions_example": list(test.captions[:3]),
    }


def first_per_category(prompts: list[dict], k: int) -> list[dict]:
    """The first k prompts of each category (a quick run)."""
    count: dict[str, int] = {}
    out = []
    for p in prompts:
        count[p["category"]] = count.get(p["category"], 0) + 1
        if count[p["category"]] <= k:
            out.append(p)
    return out


def _line(name: str, params: int, step, w: float, r: dict) -> str:
    cats = ", ".join(
        f"{c} {v['fraction']:.0%} ({v['fraction_stated']:.0%} stated facts only, n={v['n']})"
        for c, v in r.items()
        if c in CATEGORIES
    )
    return f"{name} ({params / 1e6:.2f}M, step {step}) w={w:g}: {cats}"


def run_model(name, path, prompts, args, judge_fn, cond_fn=None, categories=CATEGORIES):
    """One model at every guidance scale: ({"w=..": per-category scores}, summary lines)."""
    from difforge.pipeline import load

    model = load(path)
    params = model.summary()["parameters"]
    prov = model.pipeline.provenance if model.pipeline else {}
    out = {"path": path, "parameters": params, "provenance": prov}
    data = prov.get("dataset")
    if isinstance(data, dict) and data.get("kind") == "scene_captions":
        # combo_held_out means "never stated in training" only for the combos the model held out
        trained = data.get("held_out_combos", HELD_OUT_COMBOS)
        out["held_out_combos_match"] = {tuple(c) for c in trained} == set(HELD_OUT_COMBOS)
        if not out["held_out_combos_match"]:
            print(f"warning: {name} held out {trained}, not {HELD_OUT_COMBOS}", flush=True)
    lines, chosen = [], [p for p in prompts if p["category"] in categories]
    for w in (float(g) for g in args.guidance.split(",")):
        t0 = time.monotonic()
        kw = {"cond_fn": cond_fn} if cond_fn else {}
        r = score(model, chosen, args.per_prompt, w, args.steps, judge_fn, categories, **kw)
        r["seconds"] = round(time.monotonic() - t0, 1)
        out[f"w={w:g}"] = r
        lines.append(_line(name, params, prov.get("step"), w, r))
        print(lines[-1], flush=True)
    return out, lines


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--model", action="append", default=[], help="NAME=PATH text model (repeatable)"
    )
    ap.add_argument(
        "--oracle", action="append", default=[],
        help="NAME=PATH text model with a layout stage, given the slot model's layout "
        "(clause_slots) instead of its planner's: the image stage alone (repeatable)",
    )  # fmt: skip
    ap.add_argument("--slot-model", default="models/scenes-latent", help="'' to skip")
    ap.add_argument("--per-prompt", type=int, default=4)
    ap.add_argument("--guidance", default="1,2,4")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--ceiling-n", type=int, default=2000)
    ap.add_argument("--limit", type=int, default=0, help="first N prompts per category (0: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="prompt_following_scenes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from difforge.data.scene_captions import fit_scene_thresholds
    from difforge.evaluation.features import load_feature_extractor
    from difforge.evaluation.scenes import judge_clauses

    extractor = load_feature_extractor()
    thresholds = fit_scene_thresholds()
    prompts = prompt_set()
    if args.limit:
        prompts = first_per_category(prompts, args.limit)

    def judge_fn(images, ps):
        return judge_clauses(extractor, images, [p["clauses"] for p in ps], thresholds, True)

    results, lines = {}, []
    for spec in args.model:
        name, _, path = spec.partition("=")
        results[name], more = run_model(name, path, prompts, args, judge_fn)
        lines += more
    for spec in args.oracle:
        name, _, path = spec.partition("=")
        results[f"{name}+oracle"], more = run_model(
            f"{name}+oracle", path, prompts, args, judge_fn,
            cond_fn=lambda p: {"prompt": p["prompt"], "slots": clause_slots(p["clauses"])},
        )  # fmt: skip
        lines += more
    if args.slot_model:
        results["slots"], more = run_model(
            "slots", args.slot_model, prompts, args, judge_fn,
            cond_fn=lambda p: {"slots": clause_slots(p["clauses"])}, categories=SLOT_CATEGORIES,
        )  # fmt: skip
        lines += more
    ceiling = real_ceiling(extractor, args.ceiling_n)
    summary = (
        f"per prompt {args.per_prompt} images, {args.steps} steps (n per category in each entry); "
        + "; ".join(lines)
        + f"; judge on real test scenes with their own captions {ceiling['fraction']:.1%} "
        f"(n={ceiling['n']})"
    )
    serial = [{**p, "clauses": [asdict(c) for c in p["clauses"]]} for p in prompts]
    payload = {"prompts": serial, "results": results, "real_ceiling": ceiling, "steps": args.steps}
    print(write_result(args.name, payload, summary))
    return payload


if __name__ == "__main__":
    main()
