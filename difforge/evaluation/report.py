"""The evaluation run: sample a model with one sampler setting, repeat over seeds, write a report.

`evaluate_model` draws `n` images per repeat, one repeat per seed (at least MIN_REPEATS: EDM
reports the minimum FID of three runs, and one number hides the seed spread), scores each repeat
with `evaluate_images`, and returns a JSON-able report:

  "metrics":    name -> {"mean", "std", "min", "max", "per_repeat"} over the repeats, or None when
                not computed (difforge.registry's gates read "mean"); FIDs against other splits
                are named "fid_<split>";
  "repeats":    per repeat: seed, metrics, metric settings, label counts, timings;
  "model", "sampler", "labels", "num_samples", "seeds": what was sampled, and how;
  "extractor", "classifier", "reference", "other_references", "train": what it was measured
                against (names, weights sha256, dataset content hashes);
  "software", "date", "wall_time_s", "config": when, with which code, from which settings.

Seeds: image i of the repeat with seed s is drawn from noise seed s * SEED_STRIDE + i, so repeats
never share noise, and the first k images of a run with n > k are the images of a run with n = k.
"""

from __future__ import annotations

import ctypes
import json
import math
import platform
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from difforge.common.atomic import write_text_atomic
from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.data.mnist import ImageDataset, load_mnist
from difforge.evaluation.evaluate import METRIC_KEYS, evaluate_images
from difforge.evaluation.features import FeatureExtractor, extract, load_feature_extractor
from difforge.evaluation.metrics import check_fid_sample_count, feature_stats, fid_from_stats
from difforge.evaluation.reference import ReferenceStats, reference_stats
from difforge.model import Model, code_version, load
from difforge.samplers import GRID_KINDS, SAMPLERS, get_sigmas, sampler_knobs

REPORT_FORMAT = "difforge-eval-report/1"
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


# --- seeds, labels, batches ------------------------------------------------------------------


def image_seeds(seed: int, n: int) -> list[int]:
    """Noise seeds of the n images of the repeat with seed `seed`: seed * SEED_STRIDE + i."""
    check_seed(seed)
    check_n(n)
    return [seed * SEED_STRIDE + i for i in range(n)]


def make_labels(policy: str, n: int, num_classes: int, seed: int) -> list[int] | None:
    """Class labels of n images: None for an unconditional model (num_classes = 0).

    balanced: image i gets class i % num_classes (every prefix is as balanced as it can be);
    random: uniform over the classes, drawn with numpy's default_rng(seed).
    """
    check_choice("label policy", policy, LABEL_POLICIES)
    if num_classes == 0:
        return None
    if policy == "balanced":
        return [i % num_classes for i in range(n)]
    return np.random.default_rng(seed).integers(0, num_classes, n).tolist()


def in_batches(
    draw: Callable[[list[int] | None, list[int]], tuple[Tensor, int]],
    labels: Sequence[int] | None,
    seeds: Sequence[int],
    batch_size: int,
) -> tuple[Tensor, int]:
    """Call `draw(labels, seeds) -> (uint8 images, nfe)` on batches; (all images, NFE per image)."""
    chunks, nfe = [], 0
    for start in range(0, len(seeds), batch_size):
        stop = start + batch_size
        images, nfe = draw(
            None if labels is None else list(labels[start:stop]), list(seeds[start:stop])
        )
        chunks.append(images)
    return torch.cat(chunks), nfe


def resolve_sampling(
    model: Model,
    sampler: str | None,
    steps: int | None,
    guidance: float | None,
    grid: str | None,
    knobs: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The sampler settings `Model.sample` will use: the given ones over the model's defaults."""
    d = model.config.sampling
    w = float(d.guidance if guidance is None else guidance)
    return {
        "sampler": d.sampler if sampler is None else sampler,
        "steps": d.steps if steps is None else steps,
        "guidance": w if model.num_classes else 1.0,  # an unconditional model is never guided
        "grid": d.grid if grid is None else grid,
        "knobs": dict(knobs or {}),
    }


def draw_with(model: Model, sampling: Mapping[str, Any]) -> Callable:
    """A `draw(labels, seeds)` for `in_batches` that calls `model.sample` with `sampling`."""
    s = dict(sampling)
    knobs = s.pop("knobs", {})

    def draw(labels: list[int] | None, seeds: list[int]) -> tuple[Tensor, int]:
        out = model.sample(labels=labels, n=len(seeds), seeds=seeds, **s, **knobs)
        return out.images, out.nfe

    return draw


def describe_sampling(model: Model, sampling: Mapping[str, Any], nfe: int | None) -> dict:
    """Every sampler setting: name, steps, grid and its sigmas, guidance, all knobs, NFE."""
    sigmas = get_sigmas(sampling["grid"], sampling["steps"], process=model.process)
    return {
        "name": sampling["sampler"],
        "steps": sampling["steps"],
        "nfe": nfe,
        "grid": sampling["grid"],
        "guidance": sampling["guidance"],
        "knobs": sampler_knobs(sampling["sampler"]) | dict(sampling["knobs"]),
        "sigmas": [float(s) for s in sigmas],
        "process": dict(model.config.process),
    }


# --- what the samples are measured against ------------------------------------------------------


@dataclass(frozen=True)
class Against:
    """The extractor, the reference statistics and the training set a run measures against."""

    extractor: FeatureExtractor
    reference: ReferenceStats
    others: dict[str, ReferenceStats]  # label -> stats, FID only ("fid_<label>")
    train: ImageDataset | Tensor | None  # memorization set; None skips it


def default_reference(
    split: str, extractor: FeatureExtractor, cache_dir: str | Path | None = None
) -> ReferenceStats:
    """Reference statistics of MNIST `split` under `extractor`, from the disk cache if it matches."""
    check_choice("reference split", split, SPLITS)
    return reference_stats(load_mnist(split), extractor, cache_dir=cache_dir)


def check_reference(reference: Any) -> None:
    if reference is not None and not isinstance(reference, ReferenceStats):
        raise InvalidArgumentError(
            f"reference must be ReferenceStats, got {type(reference).__name__} "
            "(to pick an MNIST split, set reference_split)"
        )


def check_trained_on_mnist(model: Model) -> None:
    """The default references are MNIST's: refuse a model whose provenance names another dataset
    (a model without provenance passes; the extractor still checks the image shape)."""
    spec = model.config.provenance.get("dataset")
    kind = spec.get("kind") if isinstance(spec, Mapping) else spec
    if isinstance(kind, str) and not kind.lower().startswith("mnist"):
        raise InvalidArgumentError(
            f"model {model.name!r} was trained on {json.dumps(spec)}, but the default references "
            "are MNIST; pass reference= (and train=) computed on its dataset"
        )


def load_against(
    model: Model,
    config: EvalConfig,
    extractor: FeatureExtractor | None,
    reference: ReferenceStats | None,
    other_references: Mapping[str, ReferenceStats] | None,
    train: ImageDataset | Tensor | None,
) -> Against:
    """Fill in MNIST defaults for whatever was not given (see `evaluate_model`)."""
    check_reference(reference)
    if reference is None or (config.memorization and train is None):
        check_trained_on_mnist(model)
    extractor = extractor or load_feature_extractor()
    others = dict(other_references or {})
    if reference is None:
        reference = default_reference(config.reference_split, extractor, config.cache_dir)
        if other_references is None and config.other_split_fid:
            other = next(s for s in SPLITS if s != config.reference_split)
            others[other] = default_reference(other, extractor, config.cache_dir)
    if config.memorization and train is None:
        train = load_mnist("train")
    return Against(extractor, reference, others, train if config.memorization else None)


def check_model_fits(model: Model, extractor: FeatureExtractor, n: int, dim: int) -> None:
    """Fail before sampling when the extractor cannot read the model's images or n is too small."""
    check_fid_sample_count(n, dim)
    try:
        extractor.features(torch.zeros(2, *model.image_shape))
    except InvalidArgumentError as e:
        raise InvalidArgumentError(
            f"model {model.name!r} makes {tuple(model.image_shape)} images, which extractor "
            f"{extractor.name!r} cannot read: {e}"
        ) from None


def score(
    images: Tensor, labels: Sequence[int] | None, against: Against, seed: int
) -> dict[str, Any]:
    """`evaluate_images` of one repeat, plus "fid_<label>" against each other reference."""
    lab = None if labels is None else torch.tensor(labels, dtype=torch.int64)
    r = evaluate_images(images, lab, against.extractor, against.reference, against.train, seed=seed)
    if against.others:
        t0 = time.perf_counter()
        stats = feature_stats(extract(against.extractor.features, images))
        for name, ref in against.others.items():
            r["metrics"][f"fid_{name}"] = fid_from_stats(*stats, ref.mu, ref.sigma)
        r["timings_s"]["fid_other"] = round(time.perf_counter() - t0, 3)
    return r


# --- the run ------------------------------------------------------------------------------------


def _openblas_thread_controls() -> list[tuple[Callable[[], int], Callable[[int], None]]]:
    """(get, set) thread-count functions of each OpenBLAS loaded in this process (numpy's and
    scipy's each bundle one), found the way threadpoolctl finds them; [] where there is none."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return []
    paths = {line.split()[-1] for line in maps.splitlines() if "openblas" in line.lower()}
    controls = []
    for path in sorted(p for p in paths if p.startswith("/") and ".so" in p):
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix in ("openblas", "scipy_openblas"):
            for suffix in ("", "64_", "_64_"):
                get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                if get is not None and set_ is not None:
                    controls.append((get, set_))
                    break
            else:
                continue
            break
    return controls


@contextmanager
def compute_threads(n: int | None) -> Iterator[None]:
    """Run the block with n torch intra-op threads and n OpenBLAS threads (None: leave them).

    Why OpenBLAS too: on busy shared cores, scipy's 2-thread OpenBLAS makes the 128x128 sqrtm
    of every FID take 2.2 s instead of 15 ms (measured on the 2-core dev box under load 6).
    """
    if n is None:
        yield
        return
    blas = _openblas_thread_controls()
    before = torch.get_num_threads(), [get() for get, _ in blas]
    torch.set_num_threads(n)
    for _, set_ in blas:
        set_(n)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        for (_, set_), k in zip(blas, before[1], strict=True):
            set_(k)


def summarize(values: Sequence[float | None]) -> dict[str, Any] | None:
    """{"mean", "std", "min", "max", "per_repeat"} of one metric over repeats.

    std is the sample standard deviation (ddof = 1): the repeats are draws from the seed
    distribution. A repeat without a finite value leaves mean/std/min/max None, so a gate never
    reads a mean that silently skipped a failed repeat; all None gives None.
    """
    if all(v is None for v in values):
        return None
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    out: dict[str, Any] = {"mean": None, "std": None, "min": None, "max": None}
    if len(finite) == len(values):
        a = np.asarray(finite)
        std = float(a.std(ddof=1)) if len(a) > 1 else 0.0
        out = {"mean": float(a.mean()), "std": std, "min": float(a.min()), "max": float(a.max())}
    return out | {"per_repeat": list(values)}


def run_info() -> dict[str, Any]:
    """Versions of the code that produced a result."""
    from difforge import __version__

    return {
        "difforge": __version__,
        "git_commit": code_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "openblas_threads": [get() for get, _ in _openblas_thread_controls()],
    }


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def describe_model(model: Model) -> dict[str, Any]:
    return {
        "name": model.name,
        "sha256": model.sha256,
        "path": None if model.path is None else str(model.path),
        "num_classes": model.num_classes,
        "image_shape": list(model.image_shape),
        "parameterization": model.config.parameterization,
        "trained_on": model.config.provenance.get("dataset"),
        "dataset_hash": model.config.provenance.get("dataset_hash"),
    }


def _run_repeat(
    model: Model, config: EvalConfig, sampling: dict, against: Against, seed: int, log: Log
) -> dict[str, Any]:
    labels = make_labels(config.labels, config.n, model.num_classes, seed)
    t0 = time.perf_counter()
    images, nfe = in_batches(
        draw_with(model, sampling), labels, image_seeds(seed, config.n), config.batch_size
    )
    sampling_s = round(time.perf_counter() - t0, 3)
    r = score(images, labels, against, seed)
    m = r["metrics"]
    log(
        f"seed {seed}: {config.n} images in {sampling_s:.1f}s ({nfe} NFE); fid {m['fid']:.4g}, "
        f"kid {m['kid_mean']:.4g}"
    )
    counts = None if labels is None else np.bincount(labels, minlength=model.num_classes).tolist()
    r |= {"seed": seed, "nfe": nfe, "label_counts": counts}
    r["timings_s"] = {"sampling": sampling_s, **r["timings_s"]}
    return r


def _assemble(
    model: Model, config: EvalConfig, sampling: dict, against: Against, repeats: list, wall: float
) -> dict[str, Any]:
    names = [*METRIC_KEYS, *(f"fid_{k}" for k in against.others)]
    first = repeats[0]
    return {
        "format": REPORT_FORMAT,
        "model": describe_model(model),
        "sampler": describe_sampling(model, sampling, first["nfe"]),
        "num_samples": config.n,
        "num_repeats": len(repeats),
        "seeds": list(config.seeds),
        "image_seeds": f"seed * {SEED_STRIDE} + i for i < {config.n}",
        "labels": {"policy": config.labels, "num_classes": model.num_classes},
        "metrics": {k: summarize([r["metrics"].get(k) for r in repeats]) for k in names},
        "repeats": [
            {k: r[k] for k in ("seed", "nfe", "metrics", "settings", "label_counts", "timings_s")}
            for r in repeats
        ],
        "extractor": first["extractor"],
        "classifier": first["classifier"],
        "reference": first["reference"],
        "other_references": {k: ref.describe() for k, ref in against.others.items()},
        "train": first["train"],
        "wall_time_s": round(wall, 3),
        "date": now_iso(),
        "software": run_info(),
        "config": asdict(config),
    }


def evaluate_model(
    model: Model | str | Path,
    config: EvalConfig | None = None,
    *,
    extractor: FeatureExtractor | None = None,
    reference: ReferenceStats | None = None,
    other_references: Mapping[str, ReferenceStats] | None = None,
    train: ImageDataset | Tensor | None = None,
    out: str | Path | None = None,
    log: Log | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Sample `model` once per seed, score every repeat, and summarise them in one report.

    Args:
        model: a loaded Model or a model folder.
        config: the settings; or give them as keywords (`evaluate_model(m, steps=10, n=5000)`).
        extractor: the feature network; default: the shipped MNIST one.
        reference: statistics every metric compares against; default: MNIST `config.reference_split`.
        other_references: label -> statistics, FID only ("fid_<label>"); default (when
            `reference` is defaulted too and `config.other_split_fid`): the other MNIST split.
        train: the memorization set (ImageDataset or uint8 images); default: MNIST train.
        out: write the report there as JSON (atomically) as well.
        log: called with one line per repeat (e.g. `print`).

    Returns:
        The report dict described in this module's docstring.
    """
    t0 = time.perf_counter()
    config = make_config(EvalConfig, config, settings)
    model = model if isinstance(model, Model) else load(model)
    log = log or (lambda _: None)
    with compute_threads(config.threads):
        against = load_against(model, config, extractor, reference, other_references, train)
        check_model_fits(model, against.extractor, config.n, against.reference.feature_dim)
        sampling = resolve_sampling(
            model, config.sampler, config.steps, config.guidance, config.grid, config.knobs
        )
        repeats = [_run_repeat(model, config, sampling, against, s, log) for s in config.seeds]
    report = _assemble(model, config, sampling, against, repeats, time.perf_counter() - t0)
    if out is not None:
        write_json(out, report)
    return report


# --- JSON -----------------------------------------------------------------------------------------


def to_json_safe(x: Any) -> Any:
    """Strict-JSON copy: NaN -> None, +-inf -> "inf"/"-inf", tuples -> lists, numpy -> Python."""
    if isinstance(x, Mapping):
        return {str(k): to_json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [to_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return x


def write_json(path: str | Path, data: Mapping[str, Any]) -> Path:
    """Write `data` as strict JSON (see `to_json_safe`), atomically; creates parent folders."""
    text = json.dumps(to_json_safe(data), indent=2, allow_nan=False) + "\n"
    return write_text_atomic(path, text)
