"""`difforge train-inpaint`: parse flags, build an InpaintTrainConfig, call
difforge.training.inpaint (a base model fine-tuned to take the mask and known pixels)."""

from __future__ import annotations

import typer

from difforge.cli.app import command, data_spec


@command("train-inpaint")
def train_inpaint_command(
    model: str = typer.Option(..., "--model", help="Base model folder (a pixel-space U-Net)."),
    out: str = typer.Option(..., "--out", help="Inpainting model folder to write (v2)."),
    name: str = typer.Option("inpaint", "--name", help="The new model's name."),
    dataset: str = typer.Option(
        "mnist:train", "--dataset", help='Data set spec: "mnist:train" or a JSON object.'
    ),
    masks: str = typer.Option(
        "half,rectangle,strokes", "--masks", help="Training mask shapes: half, rectangle, strokes."
    ),
    mask_dropout: float = typer.Option(0.1, "--mask-dropout", help="P(nothing known) per image."),
    steps: int = typer.Option(600, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    lr: float = typer.Option(2e-4, "--lr", help="AdamW learning rate."),
    ema_decay: float = typer.Option(0.995, "--ema-decay", help="Per-step EMA decay (exported)."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop early after M."),
    seed: int = typer.Option(0, "--seed", help="Seed of batches, masks and noise."),
) -> None:
    """Fine-tune a base model into a mask-conditioned inpainting model (random masks)."""

    from difforge.training.inpaint import InpaintTrainConfig, train_inpaint

    config = InpaintTrainConfig(
        name=name,
        dataset=data_spec(dataset),
        masks=tuple(m.strip() for m in masks.split(",") if m.strip()),
        mask_dropout=mask_dropout,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        ema_decay=ema_decay,
        max_minutes=max_minutes,
        seed=seed,
    )
    r = train_inpaint(model, config, out)
    typer.echo(
        f"wrote {r.folder}: {r.steps} steps, final loss {r.final_loss:.4f}, {r.seconds:.0f}s"
    )
