"""`difforge train-vae`: train a pipeline's KL autoencoder (difforge.training.vae)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from difforge.cli.app import command


@command("train-vae")
def train_vae_command(
    out: str = typer.Option(..., "--out", help="VAE folder to write (config, weights, card)."),
    config: str | None = typer.Option(
        None, "--config", help="VAETrainConfig JSON [default: the built-in scenes recipe]."
    ),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Wall-clock budget; then measure the scale and write."
    ),
) -> None:
    """Train a VAE (L1/L2 + small KL), record its latent scaling factor, write OUT."""
    from difforge.training.vae import VAETrainConfig, train_vae

    data = json.loads(Path(config).read_text()) if config else {}
    cfg = VAETrainConfig.model_validate(data)  # a ValidationError becomes one line
    result = train_vae(cfg, out, max_minutes=max_minutes)
    typer.echo(
        f"vae: {result['folder']}: {result['steps']} steps in {result['seconds']:.0f}s, "
        f"recon {result.get('recon', float('nan')):.4f}, scaling factor {result['scaling_factor']:.4f}"
    )
