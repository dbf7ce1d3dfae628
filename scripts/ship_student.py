"""Copy a distilled student into models/NAME with its card and its few-step evaluation report.

    python scripts/ship_student.py runs/mnist-fast4 models/mnist-fast --name mnist-fast \
        --command "difforge distill ..." [--command ...] --fewstep benchmarks/results/fewstep.json

The weights are copied unchanged (the sha256 is the student's); config.json gets the new name;
README.md is the card (teacher, lineage, training commands, numbers); eval_fewstep.json is the
student's row of benchmarks/fewstep.py at its sampling defaults, in the shape the registry
attaches as an evaluation report (eval*.json in a model folder).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from difforge.pipeline import ModelConfig, save_model


def _record(fewstep: dict, sha: str, steps: int, grid: str) -> dict | None:
    """The student's row at its sampling defaults (records before grids were kept are karras)."""
    rows = [
        r for r in fewstep["students"]
        if r["sha256"] == sha and r["steps"] == steps and r.get("grid", "karras") == grid
    ]  # fmt: skip
    return rows[0] if rows else None


def _method(d: dict) -> str:
    if d["method"] == "consistency":
        return (
            f"consistency: {d['cd_levels']} noise levels, one Heun step of the guided teacher "
            "between neighbours, iCT's pseudo-Huber loss"
        )
    return (
        f"{d['method']}: {d['student_steps']}-step student, {d['teacher_substeps']} teacher "
        "Euler steps per student step"
    )


def card(
    config: ModelConfig, commands: list[str], fewstep: dict, rec: dict | None, note: str = ""
) -> str:
    p, s = config.provenance, config.sampling
    d = p["distillation"]
    lineage = ", ".join("`" + a["name"] + "`" for a in p["lineage"])
    lines = [
        f"# {config.name}",
        "",
        f"A distilled few-step student of `{p['teacher']['name']}` (sha256 "
        f"`{p['teacher']['sha256']}`). Every image it produces is synthetic.",
        "",
        "| field | value |",
        "|---|---|",
        f"| teacher | `{p['teacher']['name']}` `{p['teacher']['sha256']}` |",
        f"| distilled from | `{p['distilled_from']['name']}` `{p['distilled_from']['sha256']}` |",
        f"| lineage (parent first) | {lineage} |",
        f"| method (last round) | {_method(d)} |",
        f"| training | {d['steps_done']} steps, batch {d['batch_size']}, lr {d['lr']}, EMA "
        f"half-life {d['ema_halflife_steps']} steps, {d['train_seconds']:.0f} s on a shared "
        f"2-core CPU, final loss {d['final_loss']:.4f} |",
        f"| guidance | an input of the network (one forward per step), trained for w in "
        f"{list(d['guidance_range'])} |",
        "",
        "## Sampling defaults",
        "",
        f"`{s.sampler}`, {s.steps} steps, `{s.grid}` sigma grid, guidance {s.guidance}: what it "
        "was trained for and measured with.",
        "",
        "```",
        f"difforge sample --model models/{config.name} --labels 0,1,2,3 --seed 42 --n 4 "
        "--out fast.png",
        "difforge serve --model models/mnist-cond --fast models/" + config.name,
        "```",
        "",
        "## Reproduce",
        "",
        "```",
        *commands,
        "```",
        "",
        *(
            ["Training is seeded and ran all its `--steps` within `--max-minutes`."]
            if d["steps_done"] == d["steps"]
            else [
                "Training is seeded but was stopped by `--max-minutes` on a shared machine, so a",
                "rerun stops at another step unless `--steps` is set to the step reached (above).",
            ]
        ),
        "",
        "## Evaluation",
        "",
    ]
    if rec is None:
        lines.append("Not measured yet.")
    else:
        lines += [
            f"`benchmarks/fewstep.py`, n = {rec['n']}, seeds {rec['seed']}..."
            f"{rec['seed'] + rec['n'] - 1}, labels i mod 10 (eval_fewstep.json):",
            "",
            "| method | steps | grid | forwards/image | FID | FID to teacher-50 | KID "
            "| label accuracy | ms/image |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in fewstep["teacher"] + fewstep["students"]:
            to_t = f"{r['fid_to_teacher50']:.2f}" if "fid_to_teacher50" in r else "-"
            lines.append(
                f"| {r['name']} {r['sampler']} | {r['steps']} | {r.get('grid', 'karras')} | "
                f"{r['forwards_per_image']} | {r['fid']:.2f} | {to_t} | {r['kid']:.1f} | "
                f"{r['label_accuracy']:.3f} | {r['ms_per_image']:.1f} |"
            )
        lines += [
            "",
            "FID is in difforge's feature space (models/mnist-features) against MNIST train;",
            "FID to teacher-50 is the Frechet distance to the 50-step teacher's own images (same",
            "seeds, labels and features): how close the student is to its teacher. Label accuracy",
            "is the feature network's classifier head, which no loss of the distillation used.",
            f"ms/image: {rec['threads']} thread(s) on a shared 2-core CPU (noisy).",
        ]
    if note:
        lines += ["", "## Notes", "", note]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("--name", required=True)
    ap.add_argument("--command", action="append", default=[])
    ap.add_argument("--fewstep", default="benchmarks/results/fewstep.json")
    ap.add_argument("--note", default="", help="a Notes section for the card (markdown)")
    args = ap.parse_args()
    src, dst = Path(args.src), Path(args.dst)
    config = ModelConfig.model_validate_json((src / "config.json").read_text())
    config = config.model_copy(update={"name": args.name})
    weights = load_file(str(src / "model.safetensors"))
    sha = json.loads((src / "manifest.json").read_text())["files"]["model.safetensors"]
    fewstep = json.loads(Path(args.fewstep).read_text())
    rec = _record(fewstep, sha, config.sampling.steps, config.sampling.grid)
    extra = {}
    if rec is not None:
        report = {
            "num_samples": rec["n"], "model_sha256": sha, "benchmark": "benchmarks/fewstep.py",
            "metrics": {
                k: rec[k] for k in ("fid", "kid", "label_accuracy", "fid_to_teacher50") if k in rec
            },
            "extractor": rec["extractor"], "reference": rec["reference"],
            "settings": {"seed": rec["seed"], "labels": "i mod 10"},
            "sampling": {k: rec[k] for k in ("sampler", "steps", "guidance")}
            | {"grid": rec.get("grid", "karras")},  # records before grids were kept: karras
            "nfe": rec["nfe"], "forwards_per_image": rec["forwards_per_image"],
        }  # fmt: skip
        extra["eval_fewstep.json"] = json.dumps(report, indent=2) + "\n"  # in the manifest too
    save_model(dst, config, weights, card(config, args.command, fewstep, rec, args.note), extra)
    print(f"wrote {dst} (weights sha256 {sha[:12]}...)")


if __name__ == "__main__":
    main()
