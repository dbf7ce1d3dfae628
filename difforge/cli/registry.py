"""`difforge registry ...`: model versions, gated promotion, rollback, audit (difforge.registry)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

import typer

from difforge.cli.app import app, fail, friendly_errors

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
def registry_register_student(
    ctx: typer.Context,
    path: str = typer.Argument(..., help="Student model folder (difforge distill ...)."),
    name: str | None = typer.Option(None, "--name", help="Registered name [default: the model's]."),
    report: list[str] = typer.Option([], "--report", help="Evaluation report JSON (repeatable)."),
) -> None:
    """Register a distilled student, tied to its teacher's registered version (refused if the
    teacher is not registered)."""
    from difforge.registry.students import register_student

    r, teacher = register_student(_open_registry(ctx), path, name, reports=report)
    state = "registered" if r.created else "already registered as"
    typer.echo(f"{state} {r.info.ref}, a student of {teacher.ref}")


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


@registry_command
def registry_push_adapter(
    ctx: typer.Context,
    path: str = typer.Argument(..., help="Adapter folder (difforge train-lora's output)."),
    base: str = typer.Option(..., "--base", help="The registered base model's name."),
    base_version: str = typer.Option(
        "latest", "--base-version", help="The base version (3, v3), 'latest' or an alias."
    ),
    name: str | None = typer.Option(None, "--name", help="Name requests use [default: its own]."),
    scale: float = typer.Option(1.0, "--scale", help="The scale serving applies it at."),
) -> None:
    """Store a LoRA adapter as a version tied to a base version (refused on another base)."""
    from difforge.registry.adapters import push_adapter

    r = push_adapter(_open_registry(ctx), path, base, base_version, name=name, scale=scale)
    state = "pushed" if r.created else "already pushed as"
    typer.echo(f"{state} {r.info.ref} (sha256 {r.info.sha256[:12]}..., scale {r.info.scale:g})")


@registry_command
def registry_adapters(
    ctx: typer.Context,
    name: str = typer.Argument(..., help="The base model's name."),
    version: str | None = typer.Argument(None, help="One base version; omit for all."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """List the adapter versions of a base model (serving attaches the latest of each name)."""
    from difforge.registry.adapters import list_adapters

    found = list_adapters(_open_registry(ctx), name, version)
    if as_json:
        return _echo_json([a.to_dict() for a in found])
    if not found:
        typer.echo(f"no adapters for {name}" + (f" {version}" if version else ""))
    for a in found:
        typer.echo(
            f"{a.ref}\t{a.created_at[:19]}\t{a.sha256[:12]}\trank {a.rank}\tscale {a.scale:g}"
        )
    return None
