"""`difforge data ...`: look at what a model learns from (difforge.data)."""

from __future__ import annotations

import json

import typer

from difforge.cli.app import app, friendly_errors

data_app = typer.Typer(name="data", help="Datasets: preview and describe.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("preview")
@friendly_errors
def preview_command(
    dataset: str = typer.Argument(..., help='A dataset spec: "scenes", "scenes:test", "mnist".'),
    n: int = typer.Option(16, "--n", min=1, max=1024, help="Images in the grid (the first n)."),
    out: str = typer.Option("grid.png", "--out", help="Output PNG (a captioned grid)."),
) -> None:
    """Write a grid of the dataset's first n images, captioned by their labels or slots."""
    from difforge.data import load_dataset
    from difforge.data.scenes import SceneDataset, slot_caption
    from difforge.pipeline import save_grid_png

    data = load_dataset(dataset)
    n = min(n, len(data))
    images = data.images[:n]
    if isinstance(data, SceneDataset) or getattr(data, "slots", None) is not None:
        captions = [slot_caption(s) for s in data.slots[:n]]
    elif data.labels is not None:
        captions = [str(int(v)) for v in data.labels[:n]]
    else:
        captions = None
    meta = {"dataset": json.dumps(dataset), "content_hash": data.content_hash, "n": str(n)}
    path = save_grid_png(out, images, captions=captions, metadata=meta)
    typer.echo(f"{path}: {n} images of {data.name} ({len(data)} in all, {data.content_hash})")
    for i, text in enumerate(getattr(data, "captions", ())[:n]):  # too long for a grid cell
        typer.echo(f"{i}: {text}")
