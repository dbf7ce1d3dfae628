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
            fail(str(e) or type(e).__name__)

    return wrapper


# --- commands are registered below, one section per area --------------------------------------


def main(argv: list[str] | None = None) -> None:
    """Console entry point."""
    app(args=argv if argv is not None else sys.argv[1:])


if __name__ == "__main__":
    main()
