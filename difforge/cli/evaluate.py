"""`difforge evaluate` (a report over seed repeats) and `difforge sweep` (quality vs NFE) (difforge.evaluation)."""

from __future__ import annotations

import typer

from difforge.cli.app import command, int_list


def _reference_line(text: str) -> dict[str, object]:
    """'heun:100' -> reference_sampler/steps; 'none' -> no reference line."""
    from difforge.core.errors import InvalidArgumentError

    if text.lower() == "none":
        return {"reference_sampler": None}
    name, _, steps = text.partition(":")
    if not steps.isdigit():
        raise InvalidArgumentError(f"--reference-line must be SAMPLER:STEPS or none, got {text!r}")
    return {"reference_sampler": name, "reference_steps": int(steps)}


def _echo_err(line: str) -> None:
    typer.echo(line, err=True)


def _common_options(guidance, grid, n, labels, split, batch_size, threads, cache_dir) -> dict:
    common = {"guidance": guidance, "grid": grid, "labels": labels, "reference_split": split}
    common |= {"batch_size": batch_size, "threads": threads, "cache_dir": cache_dir}
    return common | ({} if n is None else {"n": n})


GUIDANCE = typer.Option(None, "--guidance", help="CFG scale; 1 = conditional.")
GRID = typer.Option(
    None,
    "--grid",
    help="Sigma grid: karras, exponential, uniform, vp_time or vp_time_mid (few-step: even in VP "
    "time; mid ends at half vp_time's last time).",
)
LABELS = typer.Option("balanced", "--labels", help="Class labels: balanced or random.")
SPLIT = typer.Option("test", "--reference-split", help="MNIST split to compare against.")
BATCH = typer.Option(250, "--batch-size", help="Images per sampling call.")
EXTRACTOR = typer.Option(
    None, "--extractor", help="Feature network folder [default: the shipped MNIST one]."
)
THREADS = typer.Option(None, "--threads", help="Torch + BLAS threads [unchanged].")
CACHE = typer.Option(None, "--cache-dir", help="Reference statistics cache [~/.cache/difforge].")
FILTERS = typer.Option(
    None,
    "--filter",
    help="Output filter to run on the images: a name (quality, policy) with its default "
    "options, or a JSON file with a list of {name, options} (repeatable).",
)


def filter_specs(values: list[str]) -> list:
    """--filter values -> FilterSpecs: a registered name, or a JSON file of a list of specs."""
    import json
    from pathlib import Path

    from difforge.core.errors import InvalidArgumentError
    from difforge.pipeline.filters import FilterSpec

    specs = []
    for v in values:
        if v.endswith(".json"):
            data = json.loads(Path(v).read_text())
            if not isinstance(data, list):
                raise InvalidArgumentError(f"{v}: a list of {{name, options}} filters")
            specs += [FilterSpec.model_validate(d) for d in data]
        else:
            specs.append(FilterSpec(name=v))
    return specs


@command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    out: str = typer.Option(..., "--out", help="Output JSON report."),
    sampler: str | None = typer.Option(None, "--sampler", help="Sampler [default: the model's]."),
    steps: int | None = typer.Option(None, "--steps", help="Steps [default: the model's]."),
    guidance: float | None = GUIDANCE,
    grid: str | None = GRID,
    n: int | None = typer.Option(None, "--n", "--num-images", help="Images per repeat [10000]."),
    seeds: str | None = typer.Option(
        None, "--seeds", help="One repeat per seed, at least 3 [0,1,2]."
    ),
    labels: str = LABELS,
    split: str = SPLIT,
    memorization: bool | None = typer.Option(
        None, "--memorization/--no-memorization", help="Memorization vs MNIST train [on]."
    ),
    batch_size: int = BATCH,
    extractor: str | None = EXTRACTOR,
    threads: int | None = THREADS,
    cache_dir: str | None = CACHE,
    filters: list[str] | None = FILTERS,
) -> None:
    """Evaluate a model: FID, KID, label accuracy, memorization over seed repeats; with
    --filter, the output filters' pass rate (filter_pass_rate)."""
    from difforge.common.distributed import session
    from difforge.evaluation import load_feature_extractor
    from difforge.pipeline import load

    common = _common_options(guidance, grid, n, labels, split, batch_size, threads, cache_dir)
    common |= {"sampler": sampler, "steps": steps}
    seed_list = int_list(seeds, "--seeds")
    common |= {} if seed_list is None else {"seeds": tuple(seed_list)}
    common |= {} if memorization is None else {"memorization": memorization}
    if filters:
        common["filters"] = filter_specs(filters)
    feats, m = load_feature_extractor(extractor), load(model)
    with session() as world:  # under torchrun: sampler calls dealt over the ranks
        _evaluate_report(m, feats, common, out, world.is_main)


@command("sweep")
def sweep_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    out: str = typer.Option(..., "--out", help="Output JSON sweep."),
    nfe: str = typer.Option(..., "--nfe", help="NFE budgets, e.g. 5,8,10,15,20,50."),
    samplers: str | None = typer.Option(
        None, "--samplers", help="'all' (one per algorithm) or comma-separated names [all]."
    ),
    reference_line: str | None = typer.Option(
        None, "--reference-line", help="SAMPLER:STEPS reference, or none [heun:100]."
    ),
    plot: str | None = typer.Option(None, "--plot", help="Write FID/KID vs NFE (PNG)."),
    guidance: float | None = GUIDANCE,
    grid: str | None = GRID,
    n: int | None = typer.Option(
        None, "--n", "--num-images", help="Images per sweep point [2000]."
    ),
    seed: int | None = typer.Option(None, "--seed", help="The one seed every point draws [0]."),
    labels: str = LABELS,
    split: str = SPLIT,
    batch_size: int = BATCH,
    extractor: str | None = EXTRACTOR,
    threads: int | None = THREADS,
    cache_dir: str | None = CACHE,
) -> None:
    """Sweep quality against NFE: samplers x budgets, with a converged reference line."""
    from difforge.common.distributed import session
    from difforge.evaluation import load_feature_extractor
    from difforge.pipeline import load

    common = _common_options(guidance, grid, n, labels, split, batch_size, threads, cache_dir)
    common["nfe"] = tuple(int_list(nfe, "--nfe") or ())
    if samplers is not None:
        common["samplers"] = "all" if samplers == "all" else tuple(samplers.split(","))
    common |= {} if reference_line is None else _reference_line(reference_line)
    common |= {} if seed is None else {"seed": seed}
    feats, m = load_feature_extractor(extractor), load(model)
    with session() as world:
        _evaluate_sweep(m, feats, common, out, plot, world.is_main)


def _evaluate_report(m, feats, settings: dict, out: str, main: bool) -> None:
    from difforge.evaluation import evaluate_model

    r = evaluate_model(m, extractor=feats, out=out, log=_echo_err if main else None, **settings)
    if not main:
        return
    s, met = r["sampler"], r["metrics"]
    parts = [
        f"{k} {met[k]['mean']:.4g} ± {met[k]['std']:.2g} (min {met[k]['min']:.4g})"
        for k in ("fid", "kid_mean", "label_accuracy", "memorization_rate", "filter_pass_rate")
        if met.get(k) and met[k]["mean"] is not None
    ]
    typer.echo(
        f"wrote {out}: {r['num_repeats']} repeats x {r['num_samples']} images, {s['name']} "
        f"{s['steps']} steps ({s['nfe']} NFE), guidance {s['guidance']:g}: " + "; ".join(parts)
    )


def _evaluate_sweep(m, feats, settings: dict, out: str, plot: str | None, main: bool) -> None:
    from difforge.evaluation import nfe_sweep

    log = _echo_err if main else None
    r = nfe_sweep(m, extractor=feats, out=out, plot=plot, log=log, **settings)
    if not main:
        return
    ref = r["reference_line"]
    line = ""
    if ref is not None:
        line = f"; reference {ref['method']} {ref['nfe']} NFE: fid {ref['metrics']['fid']:.4g}"
    wrote = out if plot is None else f"{out} and {plot}"
    typer.echo(f"wrote {wrote}: {len(r['points'])} points of {r['num_samples']} images each{line}")
