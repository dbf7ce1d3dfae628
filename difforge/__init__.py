"""difforge: train, sample, evaluate and serve diffusion models.

`difforge.load(path)` returns a `Model` from a model folder; see `difforge.pipeline`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from difforge.pipeline import Model, load

__all__ = ["Model", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import difforge.core` stays light.
    if name in ("Model", "load"):
        from difforge import pipeline as model

        return getattr(model, name)
    raise AttributeError(f"module 'difforge' has no attribute {name!r}")
