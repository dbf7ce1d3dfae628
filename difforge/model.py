"""Compatibility: `difforge.model` is now `difforge.pipeline` (artifact I/O, configs, the Model
facade, the request resolver and PNG rendering live there, one concept per module)."""

from difforge.pipeline import *  # noqa: F403
from difforge.pipeline import __all__  # noqa: F401
