"""`difforge upscale`: super-resolve PNG images with an upsampler or a cascade (thin: read the
files, resolve, call `difforge.pipeline.upscale`, write PNGs with their provenance)."""

from __future__ import annotations

from pathlib import Path

import typer

from difforge.cli.app import command, fail


def output_paths(out: str, n: int) -> list[Path]:
    """One input: OUT itself; several: OUT's stem with -0, -1, ... (out.png -> out-0.png)."""
    p = Path(out)
    return [p] if n == 1 else [p.with_name(f"{p.stem}-{i}{p.suffix or '.png'}") for i in range(n)]


@command("upscale")
def upscale_command(
    model: str = typer.Option(..., "--model", help="Upsampler or cascade model folder."),
    image: list[str] = typer.Option(
        ..., "--image", help="Low-resolution PNG (repeatable: one output per input)."
    ),
    out: str = typer.Option("upscaled.png", "--out", help="Output PNG (several: OUT-i.png)."),
    seed: int | None = typer.Option(
        None, "--seed", help="Image i uses seed + i [default: random, printed]."
    ),
    sampler: str | None = typer.Option(None, "--sampler", help="Sampler [default: the model's]."),
    steps: int | None = typer.Option(None, "--steps", help="Steps [default: the model's]."),
    level: float | None = typer.Option(
        None, "--level", help="Conditioning augmentation std [default: the model's]."
    ),
) -> None:
    """Upscale low-resolution images (e.g. 14x14 -> 28x28) with a super-resolution model.

    Each input PNG must have the upsampler's input size; the outputs carry the model, seed,
    settings and each input's sha256 in their PNG text chunks.
    """
    from difforge.common.atomic import write_bytes_atomic
    from difforge.common.png import png_bytes
    from difforge.pipeline import load
    from difforge.pipeline.render import grid_metadata
    from difforge.pipeline.upscale import upscale

    for path in image:
        if not Path(path).is_file():
            fail(f"--image: no such file: {path}")
    m = load(model)
    data = [Path(p).read_bytes() for p in image]
    samples = upscale(
        m, data if len(data) > 1 else data[0], seed=seed, sampler=sampler, steps=steps, level=level
    )
    meta = grid_metadata(m, samples)
    paths = output_paths(out, len(data))
    for i, (path, img) in enumerate(zip(paths, samples.images, strict=True)):
        one = meta | {"seeds": f"[{samples.seeds[i]}]", "input": image[i]}
        write_bytes_atomic(path, png_bytes(img, one))
    shape = "x".join(map(str, samples.images.shape[-2:]))
    typer.echo(
        f"wrote {', '.join(map(str, paths))}: {len(paths)} image(s) at {shape}, "
        f"{samples.sampler} {samples.steps} steps, {samples.nfe} NFE, seed {samples.seeds[0]}"
    )


@command("cascade")
def cascade_command(
    base: str = typer.Option(..., "--base", help="Base model folder (e.g. 14x14)."),
    upsampler: str = typer.Option(..., "--upsampler", help="Upsampler folder (a low_res key)."),
    out: str = typer.Option(..., "--out", help="Cascade folder to write."),
    name: str | None = typer.Option(None, "--name", help="Cascade name [the folder's]."),
    sampler: str | None = typer.Option(None, "--sampler", help="Upsampler stage's sampler."),
    steps: int | None = typer.Option(None, "--steps", help="Upsampler stage's steps."),
    level: float | None = typer.Option(None, "--level", help="Augmentation level at sampling."),
    card: str | None = typer.Option(None, "--card", help="README.md text file for the folder."),
) -> None:
    """Write a cascade folder (base -> upsampler) from two model folders, checked to fit."""
    from difforge.pipeline.cascade import save_cascade

    settings = {"sampler": sampler, "steps": steps, "level": level}
    text = Path(card).read_text() if card else ""
    folder = save_cascade(
        out,
        base,
        upsampler,
        name=name,
        upsampler_settings={k: v for k, v in settings.items() if v is not None},
        card=text,
    )
    typer.echo(f"wrote {folder}")
