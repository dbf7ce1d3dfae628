"""`difforge review`: the human review queue of a running service (difforge.serving.review)."""

from __future__ import annotations

import typer

from difforge.cli.app import app, friendly_errors

review_app = typer.Typer(
    help="List, show, approve and reject outputs a service's filters held for review.",
    no_args_is_help=True,
)
app.add_typer(review_app, name="review")

URL = typer.Option("http://127.0.0.1:8000", "--url", help="The service.")
KEY = typer.Option(
    None, "--key", help="Admin API key [default: $DIFFORGE_API_KEY; none from loopback]."
)


def _client(url: str, key: str | None):
    from difforge.serving.review_client import ReviewClient

    return ReviewClient(url, key)


@review_app.command("list")
@friendly_errors
def review_list(
    url: str = URL,
    key: str | None = KEY,
    state: str = typer.Option("pending", "--state", help="pending, approved or all."),
    as_json: bool = typer.Option(False, "--json", help="Print the JSON answer."),
) -> None:
    """Held outputs: request id, state, age, size and why each was held."""
    import json

    data = _client(url, key).list(state)
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    typer.echo(
        f"{len(data['held'])} {state}; queue {data['items']}/{data['max_items']} outputs, "
        f"{data['bytes']}/{data['max_bytes']} bytes"
    )
    for h in data["held"]:
        reasons = sorted({r for image in h["filters"] for d in image for r in d["reasons"]})
        typer.echo(
            f"{h['request_id']}  {h['state']}  {h['held_at']}  key {h['key_id']}  "
            f"{h['bytes']} B  {'; '.join(reasons) or '-'}"
        )


@review_app.command("show")
@friendly_errors
def review_show(
    request_id: str = typer.Argument(..., help="The held request's id."),
    out: str = typer.Option(..., "--out", help="Write the held output here (PNG or JSON)."),
    url: str = URL,
    key: str | None = KEY,
) -> None:
    """Fetch a held output to look at it before deciding."""
    from pathlib import Path

    body, media = _client(url, key).show(request_id)
    Path(out).write_bytes(body)
    typer.echo(f"wrote {out}: {len(body)} bytes, {media}")


def _decide(verdict: str, request_id: str, url: str, key: str | None, note: str | None) -> None:
    held = _client(url, key).decide(request_id, verdict, note)
    done = {"approve": "approved", "reject": "rejected"}[verdict]
    typer.echo(f"{held['request_id']}: {done} by {held['decided_by']}")


NOTE = typer.Option(None, "--note", help="Why (kept in the audit log).")


@review_app.command("approve")
@friendly_errors
def review_approve(
    request_id: str = typer.Argument(..., help="The held request's id."),
    url: str = URL,
    key: str | None = KEY,
    note: str | None = NOTE,
) -> None:
    """Release a held output: its client's next poll gets the images."""
    _decide("approve", request_id, url, key, note)


@review_app.command("reject")
@friendly_errors
def review_reject(
    request_id: str = typer.Argument(..., help="The held request's id."),
    url: str = URL,
    key: str | None = KEY,
    note: str | None = NOTE,
) -> None:
    """Drop a held output: its client's poll answers 410."""
    _decide("reject", request_id, url, key, note)
