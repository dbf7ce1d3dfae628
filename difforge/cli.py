"""The `difforge` command line. Thin: parse, build a config, call one library function.

Every command turns a difforge error into one readable line on stderr and exit code 2.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps

import typer

from difforge.core.errors import DifforgeError

app = typer.Typer(
    name="difforge",
    help="Train, sample, evaluate, register and serve diffusion models.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def fail(message: str, code: int = 2) -> None:
    """Print one readable line and exit non-zero."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def friendly_errors(fn: Callable) -> Callable:
    """Decorator for commands: library errors and bad files become one line and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DifforgeError, FileNotFoundError, PermissionError, ValueError) as e:
            from difforge.common.validation import readable  # pydantic only on this path

            fail(readable(e))

    return wrapper


# --- commands are registered below, one section per area --------------------------------------


# --- train / sample / info (training engineer; library code in difforge.training, difforge.pipeline)


def _int_list(text: str | None, what: str) -> list[int] | None:
    """'0,1,2' -> [0, 1, 2]; None stays None."""
    from difforge.core.errors import InvalidArgumentError

    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise InvalidArgumentError(
            f"{what} must be comma-separated integers, got {text!r}"
        ) from None


def _command(name: str) -> Callable:
    """Register a command wrapped by friendly_errors; OS errors (disk full, a file where a
    folder should be) also become one line."""

    def register(fn: Callable) -> Callable:
        @wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                if isinstance(e, FileNotFoundError | PermissionError):
                    raise
                fail(str(e) or type(e).__name__)

        return app.command(name)(friendly_errors(wrapper))

    return register


@_command("train")
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
    """Train a diffusion model from a JSON config; the model lands in OUT/model."""
    from difforge.training import describe, load_config, train

    cfg = load_config(config)
    if dry_run:
        d = describe(cfg)
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
        return
    result = train(
        cfg,
        out,
        resume=resume,
        force=force,
        max_minutes=max_minutes,
        until_step=until_step,
        progress=progress,
    )
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


@_command("sample")
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
    seed: int | None = typer.Option(
        None, "--seed", help="Image i uses seed + i [default: random, printed]."
    ),
    n: int | None = typer.Option(None, "--n", help="Number of images [default: len(labels) or 1]."),
    grid: str | None = typer.Option(
        None, "--grid", help="Sigma grid: karras, exponential, uniform."
    ),
    option: list[str] | None = typer.Option(
        None, "--option", help="KEY=VALUE sampler option, e.g. max_order=3 (repeatable)."
    ),
    out: str = typer.Option("grid.png", "--out", help="Output PNG (a captioned grid)."),
) -> None:
    """Sample an image grid from a model, with provenance in the PNG's text chunks."""
    from difforge.pipeline import load, resolve, save_samples_png

    m = load(model)
    request: dict[str, object] = _options(cond, "--cond")
    if labels is not None:
        key = m.spec.class_key()
        if key is None:
            fail(f"--labels: model {m.name!r} has no class key (conditioning: {m.spec.names})")
        request[key.name] = _int_list(labels, "--labels")
    flags = {"n": n, "seed": seed, "sampler": sampler, "steps": steps, "guidance": guidance}
    request |= {k: v for k, v in (flags | {"grid": grid}).items() if v is not None}
    request["options"] = _options(option, "--option")
    samples = m.generate(resolve(m, request))
    path = save_samples_png(m, samples, out)
    typer.echo(
        f"wrote {path}: {len(samples.seeds)} images, {samples.sampler} {samples.steps} steps, "
        f"guidance {samples.guidance:g}, {samples.nfe} NFE, seeds {samples.seeds[0]}..{samples.seeds[-1]}"
    )


@_command("info")
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


# --- end of train / sample / info section -----------------------------------------------------


# --- registry: difforge registry [--registry URL] [--artifacts DIR] COMMAND ------------------
# (registry section: owned by the registry engineer; library code in difforge.registry)

registry_app = typer.Typer(
    name="registry",
    help="Model registry: versions with provenance, gated promotion, rollback, audit.",
    no_args_is_help=True,
)
app.add_typer(registry_app, name="registry")


@registry_app.callback()
def registry_options(
    ctx: typer.Context,
    registry: str = typer.Option(
        "sqlite:///registry.db",
        "--registry",
        envvar="DIFFORGE_REGISTRY_URL",
        help="SQLAlchemy URL of the registry database (e.g. postgresql+psycopg://host/db).",
    ),
    artifacts: str | None = typer.Option(
        None,
        "--artifacts",
        envvar="DIFFORGE_REGISTRY_ARTIFACTS",
        help="Artifact directory (default: '<db stem>-artifacts' beside a SQLite file).",
    ),
) -> None:
    ctx.obj = {"url": registry, "artifacts": artifacts}


def _open_registry(ctx: typer.Context):
    from difforge.registry import Registry

    return Registry(ctx.obj["url"], ctx.obj["artifacts"])


def registry_command(fn: Callable) -> Callable:
    """friendly_errors, plus database errors (unreachable server, lock timeout) as one line."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        from sqlalchemy.exc import SQLAlchemyError

        try:
            return fn(*args, **kwargs)
        except SQLAlchemyError as e:
            fail(f"registry database error: {str(getattr(e, 'orig', None) or e).splitlines()[0]}")

    command_name = fn.__name__.removeprefix("registry_").replace("_", "-")
    return registry_app.command(command_name)(friendly_errors(wrapper))


def _echo_json(data) -> None:
    import json

    typer.echo(json.dumps(data, indent=2, default=str))


@registry_command
def registry_register(
    ctx: typer.Context,
    path: str = typer.Argument(..., help="Model folder (config.json, model.safetensors, ...)."),
    name: str | None = typer.Option(None, "--name", help="Registered name [default: the model's]."),
    report: list[str] = typer.Option([], "--report", help="Evaluation report JSON (repeatable)."),
) -> None:
    """Register a model folder as a new immutable version (identical weights: the existing one)."""
    r = _open_registry(ctx).register(path, name, reports=report)
    state = "registered" if r.created else "already registered as"
    typer.echo(f"{state} {r.info.ref} (weights {r.info.weights_sha256[:12]}...)")
    if r.reports_added:
        typer.echo(f"attached {r.reports_added} evaluation report(s)")


@registry_command
def registry_list(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Model name; omit to list models."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List models (with production and canary), or one model's versions."""
    reg = _open_registry(ctx)
    if name is None:
        rows = []
        for model in reg.list_models():
            res = reg.resolve(model)
            prod = res.production.version if res.production else None
            canary = f"v{res.canary.version} ({res.canary_percent:g}%)" if res.canary else "-"
            rows.append({"name": model, "production": prod, "canary": canary})
        if as_json:
            return _echo_json(rows)
        for r in rows:
            prod = f"v{r['production']}" if r["production"] else "-"
            typer.echo(f"{r['name']}\tproduction {prod}\tcanary {r['canary']}")
        return None
    versions = reg.list_versions(name)
    if not versions:
        fail(f"no model named {name!r} in the registry")
    if as_json:
        return _echo_json([v.to_dict() for v in versions])
    for v in versions:
        m = v.metrics
        fid = f"fid {m['fid']:.3g}" if "fid" in m else "no report"
        tags = ",".join(v.aliases) or "-"
        typer.echo(f"v{v.version}\t{v.created_at[:19]}\t{v.weights_sha256[:12]}\t{fid}\t{tags}")
    return None


@registry_command
def registry_show(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    version: str = typer.Argument("latest", help="Version (3, v3), 'latest' or an alias."),
    card: bool = typer.Option(False, "--card", help="Include the model card."),
) -> None:
    """Show one version's provenance, aliases and evaluation summaries as JSON."""
    _echo_json(_open_registry(ctx).get(name, version).to_dict(card=card))


@registry_command
def registry_promote(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    version: str = typer.Argument(..., help="Version (3, v3), 'latest' or an alias."),
    to: str = typer.Option("production", "--to", help="production or canary."),
    gates: str | None = typer.Option(None, "--gates", help="Gates JSON file (overrides defaults)."),
    percent: float | None = typer.Option(None, "--percent", help="Canary traffic share, 0-100."),
) -> None:
    """Promote a version to production or canary if it passes every quality gate."""
    p = _open_registry(ctx).promote(name, version, to=to, gates=gates, percent=percent)
    for g in p.gates:
        typer.echo(f"  pass  {g.message}")
    if not p.changed:
        typer.echo(f"{p.info.ref} is already {p.alias}")
    else:
        was = f" (was v{p.previous})" if p.previous else ""
        typer.echo(f"{p.alias} of {name} is now v{p.info.version}{was}")


@registry_command
def registry_rollback(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    alias: str = typer.Option("production", "--alias", help="Which alias to roll back."),
    reason: str | None = typer.Option(None, "--reason", help="Recorded in the audit log."),
) -> None:
    """Point production (or --alias) back at its previous version, at once."""
    info = _open_registry(ctx).rollback(name, alias, reason)
    typer.echo(f"{alias} of {name} rolled back to v{info.version}")


@registry_command
def registry_alias(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    alias: str = typer.Argument(..., help="Alias name, e.g. staging (canary: share only)."),
    version: str | None = typer.Argument(None, help="Version to point at."),
    delete: bool = typer.Option(False, "--delete", help="Remove the alias."),
    percent: float | None = typer.Option(None, "--percent", help="Set the canary's share."),
) -> None:
    """Set or remove a free-form alias, or change the canary's traffic share."""
    reg = _open_registry(ctx)
    if delete:
        old = reg.remove_alias(name, alias)
        typer.echo(f"removed {alias} of {name} (was v{old})")
    elif percent is not None:
        if alias != "canary" or version is not None:
            fail("--percent sets the canary's share: registry alias NAME canary --percent P")
        res = reg.set_canary_percent(name, percent)
        typer.echo(f"canary of {name} (v{res.canary.version}) now gets {res.canary_percent:g}%")
    elif version is None:
        fail("give a VERSION to point the alias at, or --delete")
    else:
        info = reg.set_alias(name, alias, version)
        typer.echo(f"{alias} of {name} is now v{info.version}")


@registry_command
def registry_verify(ctx: typer.Context) -> None:
    """Check the audit chain, every version row and every stored artifact; exit 1 on a problem."""
    v = _open_registry(ctx).verify()
    for problem in v.problems:
        typer.echo(f"problem: {problem}", err=True)
    summary = (
        f"{v.audit_entries} audit entries, {v.versions_checked} versions, "
        f"{v.artifacts_checked} artifacts; head {v.head}"
    )
    if not v.ok:
        fail(f"registry verification failed ({len(v.problems)} problems): {summary}", code=1)
    typer.echo(f"ok: {summary}")


@registry_command
def registry_audit(
    ctx: typer.Context,
    name: str | None = typer.Argument(None, help="Only this model's entries."),
    limit: int = typer.Option(50, "--limit", help="Show the last N entries."),
) -> None:
    """Print the audit log (oldest first)."""
    for e in _open_registry(ctx).audit_log(name, limit):
        what = f"{e.name} v{e.version}" if e.version is not None else (e.name or "")
        extra = e.details.get("reason") or e.details.get("alias") or ""
        typer.echo(f"{e.seq}\t{e.at[:19]}\t{e.actor}\t{e.action}\t{what}\t{extra}".rstrip())


@registry_command
def registry_report(
    ctx: typer.Context,
    name: str = typer.Argument(...),
    version: str = typer.Argument(...),
    path: str = typer.Argument(..., help="Evaluation report JSON."),
) -> None:
    """Attach an evaluation report to a version (needed before promotion)."""
    s = _open_registry(ctx).attach_report(name, version, path)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in s.metrics.items())
    typer.echo(f"attached report to {name} {version}: {shown}")


# --- end of registry section -------------------------------------------------------------------


# --- serve (serving engineer; library code in difforge.serving) --------------------------------


@app.command("serve")
@friendly_errors
def serve_command(
    model: str | None = typer.Option(None, "--model", help="Model folder to serve as production."),
    registry: str | None = typer.Option(
        None,
        "--registry",
        help="Registry URL: serve --name's production and canary, and follow the registry.",
    ),
    name: str | None = typer.Option(None, "--name", help="Registered model name (--registry)."),
    artifacts: str | None = typer.Option(
        None, "--artifacts", help="Registry artifact directory (default: beside a SQLite file)."
    ),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    config: str | None = typer.Option(
        None, "--config", help="Service config JSON (limits, queue, keys, audit db, registry)."
    ),
) -> None:
    """Serve a model over HTTP: POST /v1/generate, /v1/models, /metrics, health, a web page.

    With --registry URL --name NAME: the registry's production version, its canary with its
    share of traffic, /v1/admin/{promote,rollback,canary}, and automatic canary rollback.
    """
    from difforge.serving import serve

    source = {"registry": registry, "name": name, "artifacts": artifacts}  # serve() checks them
    given = {k: v for k, v in source.items() if v is not None}
    serve(model, host=host, port=port, config_path=config, **given)


# --- end of serve section ----------------------------------------------------------------------


# --- evaluate (evaluation engineer; library code in difforge.evaluation) -----------------------


def _eval_mode_check(sweep: bool, given: dict[str, object]) -> None:
    """Options of the other mode (report vs --nfe-sweep) are an error, not silently ignored."""
    report_only = ("--sampler", "--steps", "--memorization/--no-memorization")
    sweep_only = ("--samplers", "--reference-line", "--plot")
    for flag in report_only if sweep else sweep_only:
        if given.get(flag) is not None:
            fail(f"{flag} {'does not apply to' if sweep else 'needs'} --nfe-sweep")


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


@_command("evaluate")
def evaluate_command(
    model: str = typer.Option(..., "--model", help="Model folder."),
    out: str = typer.Option(..., "--out", help="Output JSON (report, or sweep with --nfe-sweep)."),
    sampler: str | None = typer.Option(None, "--sampler", help="Sampler [default: the model's]."),
    steps: int | None = typer.Option(None, "--steps", help="Steps [default: the model's]."),
    guidance: float | None = typer.Option(None, "--guidance", help="CFG scale; 1 = conditional."),
    grid: str | None = typer.Option(
        None, "--grid", help="Sigma grid: karras, exponential, uniform."
    ),
    n: int | None = typer.Option(
        None, "--n", help="Images per repeat / per sweep point [default: 10000 / 2000]."
    ),
    seeds: str | None = typer.Option(
        None, "--seeds", help="One repeat per seed, at least 3 [0,1,2]; a sweep takes one [0]."
    ),
    labels: str = typer.Option("balanced", "--labels", help="Class labels: balanced or random."),
    split: str = typer.Option("test", "--reference-split", help="MNIST split to compare against."),
    memorization: bool | None = typer.Option(
        None, "--memorization/--no-memorization", help="Memorization vs MNIST train [on]."
    ),
    nfe_sweep: str | None = typer.Option(
        None, "--nfe-sweep", help="NFE budgets, e.g. 5,8,10,15,20,50: run a sweep instead."
    ),
    samplers: str | None = typer.Option(
        None, "--samplers", help="Sweep: 'all' or comma-separated sampler names [all]."
    ),
    reference_line: str | None = typer.Option(
        None, "--reference-line", help="Sweep: SAMPLER:STEPS reference, or none [heun:100]."
    ),
    plot: str | None = typer.Option(None, "--plot", help="Sweep: write FID/KID vs NFE (PNG)."),
    batch_size: int = typer.Option(250, "--batch-size", help="Images per sampling call."),
    extractor: str | None = typer.Option(
        None, "--extractor", help="Feature network folder [default: the shipped MNIST one]."
    ),
    threads: int | None = typer.Option(None, "--threads", help="Torch + BLAS threads [unchanged]."),
    cache_dir: str | None = typer.Option(
        None, "--cache-dir", help="Reference statistics cache [~/.cache/difforge]."
    ),
) -> None:
    """Evaluate a model (FID, KID, label accuracy, memorization over seed repeats), or sweep NFE."""
    from difforge.evaluation import load_feature_extractor
    from difforge.pipeline import load

    sweep = nfe_sweep is not None
    _eval_mode_check(
        sweep,
        {"--sampler": sampler, "--steps": steps, "--memorization/--no-memorization": memorization,
         "--samplers": samplers, "--reference-line": reference_line, "--plot": plot},
    )  # fmt: skip
    seed_list = _int_list(seeds, "--seeds")
    common = {"guidance": guidance, "grid": grid, "labels": labels, "reference_split": split}
    common |= {"batch_size": batch_size, "threads": threads, "cache_dir": cache_dir}
    common |= {} if n is None else {"n": n}
    if sweep:
        common["nfe"] = tuple(_int_list(nfe_sweep, "--nfe-sweep") or ())
        if samplers is not None:
            common["samplers"] = "all" if samplers == "all" else tuple(samplers.split(","))
        common |= {} if reference_line is None else _reference_line(reference_line)
        if seed_list is not None and len(seed_list) != 1:
            fail(f"a sweep draws every point from one seed, got --seeds {seeds}")
        common |= {} if seed_list is None else {"seed": seed_list[0]}
    else:
        common |= {"sampler": sampler, "steps": steps}
        common |= {} if seed_list is None else {"seeds": tuple(seed_list)}
        common |= {} if memorization is None else {"memorization": memorization}
    feats, m = load_feature_extractor(extractor), load(model)
    if sweep:
        _evaluate_sweep(m, feats, common, out, plot)
    else:
        _evaluate_report(m, feats, common, out)


def _evaluate_report(m, feats, settings: dict, out: str) -> None:
    from difforge.evaluation import evaluate_model

    r = evaluate_model(m, extractor=feats, out=out, log=_echo_err, **settings)
    s, met = r["sampler"], r["metrics"]
    parts = [
        f"{k} {met[k]['mean']:.4g} ± {met[k]['std']:.2g} (min {met[k]['min']:.4g})"
        for k in ("fid", "kid_mean", "label_accuracy", "memorization_rate")
        if met.get(k) and met[k]["mean"] is not None
    ]
    typer.echo(
        f"wrote {out}: {r['num_repeats']} repeats x {r['num_samples']} images, {s['name']} "
        f"{s['steps']} steps ({s['nfe']} NFE), guidance {s['guidance']:g}: " + "; ".join(parts)
    )


def _evaluate_sweep(m, feats, settings: dict, out: str, plot: str | None) -> None:
    from difforge.evaluation import nfe_sweep

    r = nfe_sweep(m, extractor=feats, out=out, plot=plot, log=_echo_err, **settings)
    ref = r["reference_line"]
    line = ""
    if ref is not None:
        line = f"; reference {ref['method']} {ref['nfe']} NFE: fid {ref['metrics']['fid']:.4g}"
    wrote = out if plot is None else f"{out} and {plot}"
    typer.echo(f"wrote {wrote}: {len(r['points'])} points of {r['num_samples']} images each{line}")


# --- end of evaluate section -------------------------------------------------------------------


from difforge.cli_signals import anomaly_app, series_app  # noqa: E402  (1-D signal commands)

app.add_typer(anomaly_app, name="anomaly")
app.add_typer(series_app, name="series")


def main(argv: list[str] | None = None) -> None:
    """Console entry point: usage errors become one line too, with click's exit code 2."""
    # typer vendors click; BadParameter is public, its base UsageError is reached through it.
    usage_error = typer.BadParameter.__mro__[1]
    try:
        args = argv if argv is not None else sys.argv[1:]
        rc = app(args=args, prog_name="difforge", standalone_mode=False)
    except usage_error as e:
        if e.format_message():  # empty when click already printed the help (no arguments)
            where = e.ctx.command_path if getattr(e, "ctx", None) else "difforge"
            typer.echo(f"error: {e.format_message()} (see: {where} --help)", err=True)
        sys.exit(2)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
