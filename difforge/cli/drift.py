"""`difforge drift status`: a running service's drift monitor (difforge.serving.drift)."""

from __future__ import annotations

import typer

from difforge.cli.app import app, friendly_errors

drift_app = typer.Typer(
    help="The drift monitor of a running service: each version's window and distances.",
    no_args_is_help=True,
)
app.add_typer(drift_app, name="drift")


@drift_app.command("status")
@friendly_errors
def drift_status(
    url: str = typer.Option("http://127.0.0.1:8000", "--url", help="The service."),
    key: str | None = typer.Option(
        None, "--key", help="Admin API key (default: $DIFFORGE_API_KEY; none from loopback)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON answer."),
) -> None:
    """One line per served version: window size, FID / KID / class-mix distance, what is over."""
    import json

    from difforge.serving.drift import fetch_status, status_lines

    status = fetch_status(url, key)
    typer.echo(json.dumps(status, indent=2) if as_json else "\n".join(status_lines(status)))
