"""`difforge train`, `sample`, `info`: parse flags, resolve, call the library (difforge.training, difforge.pipeline)."""

from __future__ import annotations

import typer

from difforge.cli.app import command, fail, int_list


@command("train")
def train_command(
    config: str = typer.Option(
        ..., "--config", help="Training config JSON (e.g. configs/mnist.json)."
    ),
    out: str = typer.Option(
        ..., "--out", help="Run folder: checkpoints, metrics, samples, model/."
    ),
    max_minutes: float | None = typer.Option(
        None, "--max-minutes", help="Wall-clock budget; then checkpoint, export the model, stop."
    ),
    until_step: int | None = typer.Option(
        None, "--until-step", help="Stop (checkpoint, export) after this step, before max_steps."
    ),
    resume: bool = typer.Option(
        False, "--resume", help="Continue from the newest complete checkpoint."
    ),
    force: bool = typer.Option(
        False, "--force", help="Resume even if the config or dataset changed."
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Validate the config, build the net, print its size and cost; exit.",
    ),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar."),
) -> None:
    """Train a diffusion model from a JSON config; the model lands in OUT/model.

    Under `torchrun --nproc_per_node N -m difforge.cli train ...` it trains data-parallel (DDP)
    at the config's batch_size as the global batch; rank 0 writes the run folder.
    """
    from difforge.common.distributed import session
    from difforge.training import describe, load_config, train

    cfg = load_config(config)
    if dry_run:
        _echo_dry_run(describe(cfg), config)
        return
    with session() as world:
        result = train(
            cfg,
            out,
            resume=resume,
            force=force,
            max_minutes=max_minutes,
            until_step=until_step,
            progress=progress,
            world=world,
        )
    if not world.is_main:
        raise typer.Exit(0 if result.model_dir is not None else 130)
    loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
    typer.echo(
        f"{result.status} at step {result.step} in {result.seconds:.0f}s; loss {loss}; "
        f"non-finite steps skipped: {result.nonfinite_total}"
    )
    typer.echo(f"checkpoint: {result.checkpoint}")
    if result.model_dir is None:
        typer.echo(f"resume with: difforge train --config {config} --out {out} --resume")
        raise typer.Exit(130)
    typer.echo(f"model: {result.model_dir}")


def _echo_dry_run(d: dict, config: str) -> None:
    typer.echo(f"config ok: {config}")
    typer.echo(
        f"dataset: {d['dataset']}: {d['dataset_size']} images {d['image_shape']}, "
        f"{d['num_classes']} classes, {d['dataset_hash']}"
    )
    typer.echo(
        f"net: {d['net']}, {d['parameters']:,} parameters, "
        f"{d['flops_per_forward'] / 1e6:,.1f} MFLOPs per forward (one image)"
    )
    typer.echo(
        f"training: {d['max_steps']} steps of batch {d['batch_size']}, "
        f"~{d['flops_per_step'] / 1e9:,.1f} GFLOPs per step"
    )


def _options(pairs: list[str] | None, flag: str) -> dict[str, object]:
    """KEY=VALUE pairs, each value parsed as JSON (so 2 is an int, 0.5 a float, true a bool)."""
    import json

    out: dict[str, object] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{flag} takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            fail(f"{flag} {key}: {value!r} is not a JSON value (numbers, true/false, quoted text)")
    return out


def _text_flags(m, prompt: str | None, negative: str | None) -> dict[str, object]:
    """--prompt / --negative-prompt as the request fields of the model's text key."""
    if prompt is None and negative is None:
        return {}
    key = next((k for k in m.spec.keys if k.kind == "text"), None)
    if key is None:
        fail(f"--prompt: model {m.name!r} has no text key (conditioning: {m.spec.names})")
    out: dict[str, object] = {} if prompt is None else {key.name: prompt}
    if negative is not None:
        if not key.negative:
            fail(f"--negative-prompt: the text key {key.name!r} takes no negative prompt")
        out[key.negative] = negative
    return out


def _edit_inputs(init_image, mask, strength, resample) -> dict[str, object]:
    """The edit fields of a request: files read as PNG bytes (the resolver checks them)."""
    from pathlib import Path

    out: dict[str, object] = {}
    for flag, path, key in (("--init-image", init_image, "init_image"), ("--mask", mask, "mask")):
        if path is not None:
            if not Path(path).is_file():
                fail(f"{flag}: no such file: {path}")
            out[key] = Path(path).read_bytes()
    if strength is not None:
        out["strength"] = strength
    if resample is not None:
        jumps = int_list(resample, "--resample")
        if len(jumps) != 2:
            fail(f"--resample takes JUMP_LENGTH,JUMP_N_SAMPLE, got {resample!r}")
        out["resample"] = tuple(jumps)
    return out


@command("sample")
def sample_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    sampler: str | None = typer.Option(
        None, "--sampler", help="Sampler name [default: the model's]."
    ),
    steps: int | None = typer.Option(
        None, "--steps", help="Sampling steps [default: the model's]."
    ),
    guidance: float | None = typer.Option(None, "--guidance", help="CFG scale; 1 = conditional."),
    labels: str | None = typer.Option(
        None, "--labels", help="Comma-separated classes of the class key [default: cycle]."
    ),
    cond: list[str] | None = typer.Option(
        None, "--cond", help="KEY=JSON value of a conditioning key (repeatable)."
    ),
    prompt: str | None = typer.Option(
        None, "--prompt", help="Text prompt (the model's text key), for every image."
    ),
    negative_prompt: str | None = typer.Option(
        None, "--negative-prompt", help="Replaces the unconditional branch of guidance."
    ),
    seed: int | None = typer.Option(
        None, "--seed", help="Image i uses seed + i [default: random, printed]."
    ),
    # --num-images: torchrun's argparse takes a bare --n for an abbreviation of its own flags
    n: int | None = typer.Option(
        None, "--n", "--num-images", help="Number of images [default: len(labels) or 1]."
    ),
    grid: str | None = typer.Option(
        None,
        "--grid",
        help="Sigma grid: karras, exponential, uniform, vp_time or vp_time_mid (few-step: even in VP "
        "time; mid ends at half vp_time's last time).",
    ),
    option: list[str] | None = typer.Option(
        None, "--option", help="KEY=VALUE sampler option, e.g. max_order=3 (repeatable)."
    ),
    out: str = typer.Option("grid.png", "--out", help="Output PNG (a captioned grid)."),
    batch_size: int = typer.Option(
        64, "--batch-size", help="Images per sampler call (under torchrun: calls shared by ranks)."
    ),
    init_image: str | None = typer.Option(
        None, "--init-image", help="PNG to edit (img2img; with --mask, inpainting)."
    ),
    mask: str | None = typer.Option(
        None, "--mask", help="Mask PNG: white = generate, black = keep (needs --init-image)."
    ),
    strength: float | None = typer.Option(
        None, "--strength", help="Edit strength in (0, 1] [default 0.8; inpainting 1]."
    ),
    resample: str | None = typer.Option(
        None, "--resample", help="RePaint resampling JUMP_LENGTH,JUMP_N_SAMPLE (with --mask)."
    ),
    adapter: str | None = typer.Option(None, "--adapter", help="LoRA adapter folder to apply."),
    adapter_scale: float = typer.Option(1.0, "--adapter-scale", help="Scale of its update."),
    chunk_rows: int | None = typer.Option(
        None,
        "--chunk-rows",
        min=1,
        help="Run the network on this many rows at a time (guidance counts 2 per image): "
        "pixels then do not depend on --batch-size, and equal `difforge serve` with "
        'batch_invariance "chunk" and the same chunk_rows.',
    ),
    kernels: str = typer.Option(
        "default",
        "--kernels",
        help="Network kernels: default, or invariant (batch-invariant: pixels do not depend on "
        '--batch-size, and equal `difforge serve` under its default batch_invariance "kernels").',
    ),
    filters: list[str] | None = typer.Option(
        None,
        "--filter",
        help="Output filter (quality, policy, or a JSON list of {name, options}): decisions "
        "printed and kept in the PNG's text (repeatable).",
    ),
) -> None:
    """Sample an image grid from a model, with provenance in the PNG's text chunks.

    Under `torchrun --nproc_per_node N -m difforge.cli sample ...` the sampler calls are dealt
    over the ranks and rank 0 writes the same PNG as one process with the same --batch-size.
    """
    from difforge.common.distributed import session
    from difforge.pipeline import load, resolve, save_samples_png
    from difforge.pipeline.sharded import generate_chunked

    m = load(model)
    if adapter is not None:
        from difforge.pipeline.adapters import apply_adapter, load_adapter

        m = apply_adapter(m, load_adapter(adapter), scale=adapter_scale)
    if kernels != "default":
        m = m.with_backend("eager", kernels=kernels)
    request: dict[str, object] = _options(cond, "--cond")
    if labels is not None:
        key = m.spec.class_key()
        if key is None:
            fail(f"--labels: model {m.name!r} has no class key (conditioning: {m.spec.names})")
        request[key.name] = int_list(labels, "--labels")
    request |= _text_flags(m, prompt, negative_prompt)
    flags = {"n": n, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance}
    request |= {k: v for k, v in (flags | {"grid": grid}).items() if v is not None}
    request["options"] = _options(option, "--option")
    request |= _edit_inputs(init_image, mask, strength, resample)
    with session() as world:
        plan = resolve(m, request)
        samples = generate_chunked(m, plan, batch_size, world=world, chunk_rows=chunk_rows)
    if not world.is_main:
        return
    if filters:
        from difforge.cli.filtering import sample_with_filters

        return sample_with_filters(m, samples, filters, out)
    path = save_samples_png(m, samples, out)
    typer.echo(
        f"wrote {path}: {len(samples.seeds)} images, {samples.sampler} {samples.steps} steps, "
        f"guidance {samples.guidance:g}, {samples.nfe} NFE, seeds {samples.seeds[0]}..{samples.seeds[-1]}"
    )


@command("info")
def info_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Summarise a model: identity, size, cost, sampling defaults and provenance."""
    import json

    from difforge.pipeline import load

    s = load(model).summary()
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    p, d = s["provenance"], s["sampling"]
    keys = [f"{k['name']} ({k['kind']})" for k in s["conditioning"]]
    kind = f"{s['num_classes']} classes" if s["num_classes"] else "unconditional"
    if not s["num_classes"] and s["conditioning"]:
        kind = "conditioned on " + ", ".join(k["kind"] for k in s["conditioning"])
    lines = [
        f"{s['name']}  {s['format']}  sha256 {s['sha256']}",
        f"  {s['net']}: {s['parameters']:,} parameters, "
        f"{s['flops_per_forward'] / 1e6:,.1f} MFLOPs per forward (one image)",
        f"  images {s['image_shape']} (denoiser {s['latent_shape']}), {kind}, "
        f"{s['parameterization']} on {json.dumps(s['process'])}",
        f"  conditioning: {', '.join(keys) or 'none'}",
        f"  sampling: {d['sampler']}, {d['steps']} steps, {d['grid']} grid, "
        f"guidance {d['guidance']:g}",
    ]
    for name, c in s["components"].items():
        base = "".join(f", made for {k} {v[:12]}..." for k, v in c.get("base", {}).items())
        lines.append(
            f"  component {name}: {c['net']}, {c['parameters']:,} parameters, "
            f"sha256 {c['sha256']}{base}"
        )
    if p:
        lines += [
            f"  trained {p.get('step')} steps on {json.dumps(p.get('dataset'))} "
            f"({p.get('dataset_hash')})",
            f"  final loss {p.get('final_loss')}, code {p.get('code_version')}, "
            f"created {p.get('created')}",
        ]
    typer.echo("\n".join(lines))
