"""The settings of an evaluation run (`EvalConfig`), the seed layout, and the checks the run and
the NFE sweep share.

Seeds: image i of the repeat with seed s is drawn from noise seed s * SEED_STRIDE + i, so repeats
never share noise, and the first k images of a run with n > k are the images of a run with n = k.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.samplers import GRID_KINDS, SAMPLERS

SEED_STRIDE = 1_000_000  # noise seed of image i in the repeat with seed s: s * SEED_STRIDE + i
MIN_REPEATS = 3
MAX_SEED = (2**64 - 1) // SEED_STRIDE - 1  # keeps every noise seed below 2**64
LabelPolicy = Literal["balanced", "random"]
LABEL_POLICIES: tuple[str, ...] = ("balanced", "random")
Split = Literal["test", "train"]
SPLITS: tuple[str, ...] = ("test", "train")
Log = Callable[[str], None]


def check_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= minimum
    if not ok or (maximum is not None and value > maximum):
        bound = f" and <= {maximum}" if maximum is not None else ""
        raise InvalidArgumentError(f"{name} must be an integer >= {minimum}{bound}, got {value!r}")


def check_n(n: int) -> None:
    """Images per repeat: 1 to SEED_STRIDE (so the repeats' noise seeds never overlap)."""
    check_int("n", n, 1, SEED_STRIDE)


def check_seed(seed: int) -> None:
    check_int("seed", seed, 0, MAX_SEED)


@dataclass(frozen=True)
class EvalConfig:
    """What to sample and how to score it; stored in every report under "config"."""

    sampler: str | None = None  # a name in difforge.samplers.SAMPLERS; None: the model's default
    steps: int | None = None  # sampling steps; None: the model's default
    guidance: float | None = None  # CFG scale (1 = plain conditional); None: the model's default
    grid: str | None = None  # sigma grid: karras, exponential, uniform; None: the model's default
    knobs: Mapping[str, Any] = field(default_factory=dict)  # sampler options, e.g. {"eta": 1.0}
    n: int = 10_000  # images per repeat; FID needs more than the feature dimension (128, MNIST)
    seeds: tuple[int, ...] = (0, 1, 2)  # one repeat per seed, at least MIN_REPEATS of them
    labels: LabelPolicy = "balanced"  # conditional models: image i gets class i % C, or uniform
    batch_size: int = 250  # images per sampling call; the images do not depend on it
    reference_split: Split = "test"  # the MNIST split every metric compares against
    other_split_fid: bool = True  # also record the FID against the other split ("fid_train")
    memorization: bool = True  # memorization rate against the full MNIST training set
    threads: int | None = None  # torch and OpenBLAS threads during the run; None: unchanged
    cache_dir: str | None = None  # reference statistics cache; None: ~/.cache/difforge

    def __post_init__(self) -> None:
        object.__setattr__(self, "seeds", tuple(self.seeds))
        object.__setattr__(self, "knobs", dict(self.knobs))
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLERS)
        if self.steps is not None:
            check_int("steps", self.steps, 1)
        if self.guidance is not None and not math.isfinite(self.guidance):
            raise InvalidArgumentError(f"guidance must be finite, got {self.guidance}")
        check_n(self.n)
        if len(self.seeds) < MIN_REPEATS or len(set(self.seeds)) != len(self.seeds):
            raise InvalidArgumentError(
                f"seeds must be at least {MIN_REPEATS} distinct integers (one repeat each, "
                f"for a mean and spread), got {list(self.seeds)}"
            )
        for s in self.seeds:
            check_seed(s)
        check_common(self)


def check_common(config: Any) -> None:
    """Checks of the fields that EvalConfig and the sweep's config share."""
    if config.grid is not None:
        check_choice("sigma grid", config.grid, GRID_KINDS)
    check_choice("label policy", config.labels, LABEL_POLICIES)
    check_choice("reference split", config.reference_split, SPLITS)
    check_int("batch_size", config.batch_size, 1)
    if config.threads is not None:
        check_int("threads", config.threads, 1)


def make_config(cls: type, config: Any, settings: Mapping[str, Any]) -> Any:
    """`config`, or `cls(**settings)`; unknown setting names raise an error that lists the known."""
    if config is not None:
        if settings:
            raise InvalidArgumentError("pass a config or keyword settings, not both")
        return config
    known = [f.name for f in fields(cls)]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InvalidArgumentError(
            f"unknown setting(s) {', '.join(unknown)}; allowed: {', '.join(known)}"
        )
    return cls(**settings)
