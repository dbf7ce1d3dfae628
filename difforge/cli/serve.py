"""`difforge serve`: the HTTP service (difforge.serving)."""

from __future__ import annotations

import typer

from difforge.cli.app import app, friendly_errors


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
        None,
        "--config",
        help='Service config JSON (limits, batching: batch_invariance, default "kernels"; '
        "queue, keys, audit db, registry, result cache, output filters, drift monitor, breaker).",
    ),
    adapter: list[str] | None = typer.Option(
        None,
        "--adapter",
        help="NAME=DIR[@SCALE]: serve a LoRA adapter beside --model (repeatable).",
    ),
    fast: str | None = typer.Option(
        None,
        "--fast",
        help='A distilled student of --model: it answers route: "fast" requests and degradable '
        "requests while the circuit breaker is open (config: breaker). With --registry the "
        "production version's newest registered student is used.",
    ),
) -> None:
    """Serve a model over HTTP: POST /v1/generate, /v1/models, /metrics, health, a web page.

    With --registry URL --name NAME: the registry's production version, its canary with its
    share of traffic, /v1/admin/{promote,rollback,canary}, and automatic canary rollback.
    """
    from difforge.serving import serve

    source = {"registry": registry, "name": name, "artifacts": artifacts}  # serve() checks them
    given = {k: v for k, v in source.items() if v is not None}
    if adapter:
        given["adapters"] = [_adapter_spec(a) for a in adapter]
    if fast:
        given["fast"] = fast
    serve(model, host=host, port=port, config_path=config, **given)


def _adapter_spec(text: str) -> tuple[str, str, float]:
    """NAME=DIR[@SCALE] -> (name, folder, scale)."""
    from difforge.cli.app import fail

    name, sep, rest = text.partition("=")
    folder, _, scale = rest.rpartition("@") if "@" in rest else (rest, "", "1")
    try:
        value = float(scale)
    except ValueError:
        value = float("nan")
    if not sep or not name or not folder or value != value:
        fail(f"--adapter takes NAME=DIR or NAME=DIR@SCALE, got {text!r}")
    return name, folder, value
