"""`difforge train-layout`: train a scenes text pipeline's layout planner (difforge.training.layout)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from difforge.cli.app import command


@command("train-layout")
def train_layout_command(
    out: str = typer.Option(..., "--out", help="Planner folder to write (config, weights, card)."),
    config: str | None = typer.Option(
        None,
        "--config",
        help="LayoutTrainConfig JSON, e.g. configs/scenes_layout.json (the shipped planner's "
        "recipe); none: the built-in defaults (no segment embeddings, no word dropout).",
    ),
    steps: int | None = typer.Option(None, "--steps", min=1, help="Override max_steps."),
) -> None:
    """Train a prompt -> layout planner on captioned scenes, report its valid layouts, write OUT."""
    from difforge.training.layout import LayoutTrainConfig, train_layout

    data = json.loads(Path(config).read_text()) if config else {}
    if steps is not None:
        data["max_steps"] = steps
    cfg = LayoutTrainConfig.model_validate(data)  # a ValidationError becomes one line
    result = train_layout(cfg, out, log=typer.echo)
    report = result["report"]
    cats = ", ".join(f"{c} {v['fraction']:.1%}" for c, v in report["prompt_categories"].items())
    typer.echo(
        f"layout: {result['folder']}: {result['steps']} steps in {result['train_seconds']:.0f}s, "
        f"valid layouts on test captions {report['test_captions']['fraction']:.1%} "
        f"(n={report['test_captions']['n']}); per prompt category: {cats}"
    )
