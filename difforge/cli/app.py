"""The `difforge` Typer app and what every command shares: one-line errors, exit codes.

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


def int_list(text: str | None, what: str) -> list[int] | None:
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


def data_spec(text: str) -> str | dict:
    """A data set argument: a JSON object ('{"kind": ...}') is parsed, a name ("mnist:train")
    stays a string."""
    import json

    return json.loads(text) if text.lstrip().startswith("{") else text


def command(name: str) -> Callable:
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
