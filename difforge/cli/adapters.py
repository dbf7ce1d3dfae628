"""`difforge train-lora`: parse flags, build a LoraTrainConfig, call difforge.training.lora."""

from __future__ import annotations

import typer

from difforge.cli.app import command, data_spec, int_list


@command("train-lora")
def train_lora_command(
    model: str = typer.Option(..., "--model", help="Base model folder."),
    out: str = typer.Option(..., "--out", help="Adapter folder to write."),
    name: str = typer.Option("lora", "--name", help="Adapter name."),
    rank: int = typer.Option(4, "--rank", help="LoRA rank r."),
    alpha: float = typer.Option(4.0, "--alpha", help="LoRA alpha (update scale alpha / r)."),
    targets: str = typer.Option(
        "qkv,proj,conv1,conv2", "--targets", help="Comma-separated module names / suffixes."
    ),
    dataset: str = typer.Option(
        "mnist:train", "--dataset", help='Data set spec: "mnist:train" or a JSON object.'
    ),
    classes: str | None = typer.Option(None, "--classes", help="Keep these labels, e.g. 0,1,2."),
    stroke: str = typer.Option("any", "--stroke", help="any, thick or thin (per-class quantile)."),
    stroke_fraction: float = typer.Option(0.2, "--stroke-fraction", help="Quantile kept."),
    steps: int = typer.Option(300, "--steps", help="Optimizer steps."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images per step."),
    lr: float = typer.Option(1e-3, "--lr", help="AdamW learning rate."),
    seed: int = typer.Option(0, "--seed", help="Seed of batches and noise."),
) -> None:
    """Fine-tune LoRA adapters of a base model on a data subset; writes OUT/adapter.safetensors."""

    from difforge.training.lora import LoraTrainConfig, train_lora

    config = LoraTrainConfig(
        name=name,
        rank=rank,
        alpha=alpha,
        target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()),
        dataset=data_spec(dataset),
        classes=None if classes is None else tuple(int_list(classes, "--classes")),
        stroke=stroke,
        stroke_fraction=stroke_fraction,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
    )
    r = train_lora(model, config, out)
    typer.echo(
        f"wrote {r.folder}: {r.trained_parameters:,} trained parameters "
        f"({100 * r.trained_fraction:.2f}% of {r.base_parameters:,}), {r.images} images, "
        f"final loss {r.final_loss:.4f}, {r.seconds:.0f}s"
    )
