"""The `difforge` command line, one module per area. Thin: parse, resolve, call one library
function; every error is one line on stderr and exit code 2."""

from difforge.cli import (  # noqa: F401  (they register)
    adapters,
    data,
    distill,
    drift,
    evaluate,
    export,
    inpaint,
    layout,
    models,
    registry,
    review,
    serve,
    signals,
    upscale,
    vae,
)
from difforge.cli.app import app, fail, friendly_errors, main

__all__ = ["app", "fail", "friendly_errors", "main"]
