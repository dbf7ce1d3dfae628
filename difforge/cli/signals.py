"""`difforge anomaly ...` and `difforge series ...`: the 1-D signal commands.

Thin like the rest of the CLI: parse, build the dataset or config, call one library function
(`difforge.training.anomaly.fit_anomaly_detector`, `AnomalyDetector.scores`, `Model.sample`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from difforge.cli.app import app, data_spec, friendly_errors

anomaly_app = typer.Typer(
    name="anomaly",
    help="Anomaly detection by diffusion reconstruction: fit on normal series, score new ones.",
    no_args_is_help=True,
)
series_app = typer.Typer(
    name="series", help="Sample 1-D series from a unet1d model.", no_args_is_help=True
)
app.add_typer(anomaly_app, name="anomaly")
app.add_typer(series_app, name="series")


def _floats(text: str, what: str) -> tuple[float, ...]:
    from difforge.core.errors import InvalidArgumentError

    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidArgumentError(
            f"{what} must be comma-separated numbers, got {text!r}"
        ) from None


def _load_fit_data(data: str, length: int | None):
    """A CSV path (every row a normal series) or a dataset spec ('ucr:GunPoint', JSON)."""
    from difforge.data import SeriesDataset, load_dataset
    from difforge.data.timeseries import read_series_csv, series_from_array

    if data.lower().endswith(".csv"):
        return series_from_array(read_series_csv(data), Path(data).stem, length)
    spec = data_spec(data)
    if length is not None:
        if isinstance(spec, str):
            kind, _, name = spec.partition(":")
            spec = {"kind": kind, "name": name} if name else {"kind": kind}
        spec = {**spec, "length": length}
    dataset = load_dataset(spec)
    if not isinstance(dataset, SeriesDataset):
        from difforge.core.errors import InvalidArgumentError

        raise InvalidArgumentError(f"{data!r} is not a series dataset (ucr, sines or a .csv)")
    return dataset


@anomaly_app.command("fit")
@friendly_errors
def anomaly_fit(
    data: str = typer.Option(
        ..., "--data", help="normal series: a .csv (one per row) or a spec like 'ucr:GunPoint'"
    ),
    out: Path = typer.Option(..., "--out", help="detector folder to create"),
    normal_class: int | None = typer.Option(
        None, "--normal-class", help="with a labelled set: the class index taken as normal"
    ),
    length: int | None = typer.Option(None, "--length", help="resample series to this length"),
    steps: int = typer.Option(1000, "--steps", help="training steps"),
    seed: int = typer.Option(0, "--seed"),
    val_fraction: float = typer.Option(0.2, "--val-fraction", help="normals held out to calibrate"),
    quantile: float = typer.Option(0.95, "--quantile", help="threshold = this val-score quantile"),
    sigmas: str = typer.Option("0.1,0.2,0.4,0.8", "--sigmas", help="noise levels of the score"),
    score_steps: int = typer.Option(1, "--score-steps", help="denoising steps per level"),
) -> None:
    """Train a diffusion model on normal series only and calibrate its reconstruction score."""
    from difforge.pipeline.anomaly import ScoreConfig
    from difforge.training.anomaly import fit_anomaly_detector

    dataset = _load_fit_data(data, length)
    score = ScoreConfig(sigmas=_floats(sigmas, "--sigmas"), steps=score_steps)
    det = fit_anomaly_detector(
        dataset,
        out,
        normal_class=normal_class,
        steps=steps,
        seed=seed,
        val_fraction=val_fraction,
        quantile=quantile,
        score=score,
    )
    i = det.info
    typer.echo(
        f"detector {out}: trained on {i['train_size']} normal series ({i['steps']} steps, loss "
        f"{i['final_loss']:.4f}); threshold {det.threshold:.4g} = {quantile} quantile of "
        f"{i['val_size']} validation normals"
    )


@anomaly_app.command("score")
@friendly_errors
def anomaly_score(
    data: Path = typer.Argument(..., help="CSV of series, one per row"),
    model: Path = typer.Option(..., "--model", help="a folder written by `difforge anomaly fit`"),
    out: Path | None = typer.Option(None, "--out", help="write the CSV here instead of stdout"),
) -> None:
    """Score each row of a CSV: prints `index,score,anomaly` (1 = above the threshold)."""
    from difforge.data.timeseries import read_series_csv
    from difforge.pipeline.anomaly import load_detector

    det = load_detector(model)
    scores = det.scores(read_series_csv(data)).tolist()
    lines = ["index,score,anomaly"] + [
        f"{i},{s:.6g},{int(s > det.threshold)}" for i, s in enumerate(scores)
    ]
    text = "\n".join(lines) + "\n"
    if out is None:
        sys.stdout.write(text)
    else:
        out.write_text(text)
    flagged = sum(s > det.threshold for s in scores)
    typer.echo(f"{flagged} of {len(scores)} series above threshold {det.threshold:.4g}", err=True)


@series_app.command("sample")
@friendly_errors
def series_sample(
    model: Path = typer.Option(..., "--model", help="a unet1d model folder"),
    out: Path = typer.Option(..., "--out", help="CSV (one series per row) or .png plot"),
    n: int = typer.Option(8, "--n"),
    labels: str | None = typer.Option(None, "--labels", help="comma-separated class per series"),
    seed: int = typer.Option(42, "--seed"),
    steps: int | None = typer.Option(None, "--steps"),
    sampler: str | None = typer.Option(None, "--sampler"),
    guidance: float | None = typer.Option(None, "--guidance"),
) -> None:
    """Draw series (class-conditional with --labels) and write them as CSV rows or a plot."""
    from difforge.core.errors import InvalidArgumentError
    from difforge.pipeline import load
    from difforge.training.export import plot_series

    m = load(model)
    if len(m.image_shape) != 2:
        raise InvalidArgumentError(f"{model} makes images {m.image_shape}; use `difforge sample`")
    labs = None if labels is None else [int(v) for v in labels.split(",") if v.strip()]
    s = m.sample(labs, n, seed=seed, steps=steps, sampler=sampler, guidance=guidance)
    if out.suffix.lower() == ".png":
        plot_series(s.images, s.labels, out, title=m.name)
    else:
        x = s.images.flatten(1).numpy()  # (n, C*T)
        head = "label,seed," + ",".join(f"v{i}" for i in range(x.shape[1]))
        rows = [
            f"{'' if s.labels is None else s.labels[i]},{s.seeds[i]},"
            + ",".join(f"{v:.6g}" for v in row)
            for i, row in enumerate(x)
        ]
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text("\n".join([head, *rows]) + "\n")
    typer.echo(f"{n} series ({s.nfe} NFE, {s.sampler}, guidance {s.guidance}) -> {out}")
