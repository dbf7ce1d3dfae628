"""The `difforge` command line, one module per area. Thin: parse, resolve, call one library
function; every error is one line on stderr and exit code 2."""

import difforge.cli.export  # noqa: F401  (registers `difforge export`)
from difforge.cli import evaluate, models, registry, serve  # noqa: F401  (they register)
from difforge.cli.app import app, fail, friendly_errors, main

__all__ = ["app", "fail", "friendly_errors", "main"]
