"""Quality against cost: FID/KID (and label accuracy) of each sampler at a series of NFE budgets.

Every point draws the same n images: the same labels and the same noise seeds (image i uses seed
seed * SEED_STRIDE + i, as a report repeat does), so points differ only by sampler and steps and
their differences are paired comparisons. A reference configuration (by default Heun with 100
steps, 199 NFE) is drawn once from the same seeds and plotted as a horizontal line.

NFE -> steps: a point's target NFE is a budget; the sampler gets the most steps whose NFE is at
most the target (`expected_nfe`: Heun spends 2 per step minus 1, so a budget of 10 gives 5 steps,
9 NFE), and the NFE actually counted is recorded.

Anything that can draw images at a given number of steps is a `SweepMethod`: `DifforgeMethod`
wraps a difforge sampler; benchmarks/quality_vs_nfe.py adds diffusers' schedulers on the same
network.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor

from difforge.common.distributed import current
from difforge.core.errors import InvalidArgumentError, check_choice
from difforge.evaluation.against import (
    check_model_fits,
    check_reference,
    check_trained_on_mnist,
    default_reference,
)
from difforge.evaluation.config import (
    SEED_STRIDE,
    LabelPolicy,
    Log,
    Split,
    check_common,
    check_int,
    check_n,
    check_seed,
    make_config,
)
from difforge.evaluation.evaluate import evaluate_images
from difforge.evaluation.features import FeatureExtractor, load_feature_extractor
from difforge.evaluation.records import describe_model, now_iso, run_info, write_json
from difforge.evaluation.reference import ReferenceStats
from difforge.evaluation.sampling import (
    draw_with,
    image_seeds,
    in_batches,
    make_labels,
    resolve_sampling,
)
from difforge.evaluation.threads import compute_threads
from difforge.pipeline import Model, load
from difforge.samplers import SAMPLERS, canonical_samplers, expected_nfe, get_sigmas
from difforge.samplers.advice import few_step_problem

SWEEP_FORMAT = "difforge-nfe-sweep/1"
DEFAULT_NFE = (5, 8, 10, 15, 20, 50)
# metrics kept per point: memorization is left out (a sweep compares samplers, not models)
POINT_METRICS = (
    "fid",
    "kid_mean",
    "kid_std",
    "precision",
    "recall",
    "label_accuracy",
    "near_duplicate_rate",
)


class SweepMethod(Protocol):
    """One way to draw images at a given number of steps.

    name: unique within a sweep; family: groups methods in the plot ("difforge", "diffusers").
    draw(steps, labels, seeds) -> (uint8 images (B, C, H, W), NFE counted per image); image i
    must depend only on (labels[i], seeds[i]).
    """

    name: str
    family: str

    def nfe(self, steps: int) -> int: ...

    def draw(
        self, steps: int, labels: list[int] | None, seeds: list[int]
    ) -> tuple[Tensor, int]: ...

    def describe(self, steps: int) -> dict[str, Any]: ...


def steps_for_nfe(method: SweepMethod, target: int) -> int:
    """The most steps whose NFE is at most `target` (NFE grows with steps)."""
    if method.nfe(1) > target:
        raise InvalidArgumentError(
            f"{method.name} needs {method.nfe(1)} NFE for one step; {target} is too few"
        )
    steps = 1
    while method.nfe(steps + 1) <= target:
        steps += 1
    return steps


@dataclass(frozen=True)
class DifforgeMethod:
    """A difforge sampler driving `model` (settings left None take the model's defaults)."""

    model: Model
    sampler: str
    guidance: float | None = None
    grid: str | None = None
    knobs: Mapping[str, Any] = field(default_factory=dict)
    family: str = "difforge"

    def __post_init__(self) -> None:
        check_choice("sampler", self.sampler, SAMPLERS)

    @property
    def name(self) -> str:
        return self.sampler

    def _settings(self, steps: int) -> dict[str, Any]:
        return resolve_sampling(
            self.model, self.sampler, steps, self.guidance, self.grid, self.knobs
        )

    def nfe(self, steps: int) -> int:
        return expected_nfe(self.sampler, steps)

    def draw(self, steps: int, labels: list[int] | None, seeds: list[int]) -> tuple[Tensor, int]:
        return draw_with(self.model, self._settings(steps))(labels, seeds)

    def describe(self, steps: int) -> dict[str, Any]:
        s = self._settings(steps)
        sigmas = get_sigmas(s["grid"], steps, process=self.model.process)
        return {"library": "difforge", **s, "sigma_max": float(sigmas[0])}


@dataclass(frozen=True)
class SweepConfig:
    """Which samplers at which NFE budgets, on how many images; stored under "config"."""

    samplers: tuple[str, ...] | str = "all"  # names in SAMPLERS, or "all" (aliases left out)
    nfe: tuple[int, ...] = DEFAULT_NFE  # NFE budgets (targets); each sampler stays at or below
    n: int = 2000  # images per point; FID needs more than the feature dimension (128, MNIST)
    seed: int = 0  # one draw per point, the same noise for every point
    guidance: float | None = None  # CFG scale; None: the model's default
    grid: str | None = None  # sigma grid; None: the model's default
    labels: LabelPolicy = "balanced"
    batch_size: int = 250
    reference_split: Split = "test"  # the MNIST split the metrics compare against
    reference_sampler: str | None = "heun"  # the reference line; None: no reference line
    reference_steps: int = 100
    threads: int | None = None  # torch and OpenBLAS threads during the run; None: unchanged
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        samplers = self.samplers
        if samplers == "all" or list(samplers) == ["all"]:
            samplers = canonical_samplers()  # ddim/ddpm are euler(_ancestral): count once
        samplers = (samplers,) if isinstance(samplers, str) else tuple(samplers)
        for s in samplers:
            check_choice("sampler", s, SAMPLERS)
        if len(set(samplers)) != len(samplers):
            raise InvalidArgumentError(f"samplers listed twice: {list(samplers)}")
        object.__setattr__(self, "samplers", samplers)
        object.__setattr__(self, "nfe", tuple(self.nfe))
        if not self.nfe:
            raise InvalidArgumentError("nfe needs at least one budget")
        for v in self.nfe:
            check_int("nfe budget", v, 1)
        check_n(self.n)
        check_seed(self.seed)
        if self.reference_sampler is not None:
            check_choice("reference sampler", self.reference_sampler, SAMPLERS)
            check_int("reference_steps", self.reference_steps, 1)
        check_common(self)


@dataclass(frozen=True)
class PointInputs:
    """What every point of a sweep shares: labels, seeds and what they are measured against."""

    labels: list[int] | None
    seeds: list[int]
    extractor: FeatureExtractor
    reference: ReferenceStats
    seed: int
    batch_size: int


def evaluate_point(method: SweepMethod, steps: int, inputs: PointInputs) -> dict[str, Any]:
    """Draw `inputs.seeds` with `method` at `steps` and score them against the reference.

    Returns:
        {"method", "family", "steps", "nfe" (counted), "settings", "metrics" (POINT_METRICS),
        "timings_s"}.
    """
    t0 = time.perf_counter()
    images, nfe = in_batches(
        lambda lab, s: method.draw(steps, lab, s), inputs.labels, inputs.seeds, inputs.batch_size
    )
    sampling_s = time.perf_counter() - t0
    labels = None if inputs.labels is None else torch.tensor(inputs.labels, dtype=torch.int64)
    r = evaluate_images(images, labels, inputs.extractor, inputs.reference, seed=inputs.seed)
    return {
        "method": method.name,
        "family": method.family,
        "steps": steps,
        "nfe": nfe,
        "settings": method.describe(steps),
        "metrics": {k: r["metrics"][k] for k in POINT_METRICS},
        "timings_s": {
            "sampling": round(sampling_s, 3),
            "metrics": round(sum(r["timings_s"].values()), 3),
        },
    }


def _fmt(point: dict[str, Any]) -> str:
    m = point["metrics"]
    acc = "" if m["label_accuracy"] is None else f", label acc {m['label_accuracy']:.3f}"
    return (
        f"{point['method']} {point['steps']} steps ({point['nfe']} NFE): fid {m['fid']:.4g}, "
        f"kid {m['kid_mean']:.4g}{acc} [{point['timings_s']['sampling']:.0f}s]"
    )


def _header(model: Model, config: SweepConfig, inputs: PointInputs) -> dict[str, Any]:
    r = inputs.reference
    return {
        "format": SWEEP_FORMAT,
        "model": describe_model(model),
        "num_samples": config.n,
        "seed": config.seed,
        "image_seeds": f"{config.seed} * {SEED_STRIDE} + i for i < {config.n}",
        "guidance": resolve_sampling(model, None, None, config.guidance, None)["guidance"],
        "labels": {"policy": config.labels, "num_classes": model.num_classes},
        "extractor": {"name": inputs.extractor.name, "sha256": inputs.extractor.sha256},
        "reference": r.describe(),
        "software": run_info(),
        "config": asdict(config),
    }


def nfe_sweep(
    model: Model | str | Path,
    config: SweepConfig | None = None,
    *,
    methods: Sequence[SweepMethod] = (),
    reference_method: SweepMethod | None = None,
    extractor: FeatureExtractor | None = None,
    reference: ReferenceStats | None = None,
    out: str | Path | None = None,
    plot: str | Path | None = None,
    log: Log | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """FID/KID/label accuracy of every sampler x NFE budget, at equal n, plus a reference line.

    Args:
        model: a loaded Model or a model folder.
        config: the settings; or give them as keywords (`nfe_sweep(m, nfe=(5, 10), n=500)`).
        methods: more methods after the config's difforge samplers (e.g. diffusers schedulers).
        reference_method: draws the reference line at `config.reference_steps` steps; default:
            `config.reference_sampler` (None and no reference_method: no line).
        extractor, reference: feature network and statistics; default: MNIST's (see report).
        out: JSON path, rewritten after every point (a stopped run keeps its points).
        plot: PNG path for the FID/KID-vs-NFE figure. log: called with one line per point.

    Returns:
        {"points", "left_out" (points not drawn: `left_out`), "reference_line" (or None), "model", "num_samples", "seed", "guidance",
        "extractor", "reference", "software", "date", "wall_time_s", "config"}; points as
        `evaluate_point` returns them, plus "target_nfe".
    """
    t0 = time.perf_counter()
    config = make_config(SweepConfig, config, settings)
    model = model if isinstance(model, Model) else load(model)
    log = log or (lambda _: None)
    main = current().is_main
    plan, reference_method = _plan(model, config, methods, reference_method)
    skipped = left_out(plan)
    drop = {(p["method"], p["target_nfe"]) for p in skipped}
    plan = [(m, t, steps) for m, t, steps in plan if (m.name, t) not in drop]
    check_reference(reference)
    with compute_threads(config.threads):
        inputs = _inputs(model, config, extractor, reference)
        result = _header(model, config, inputs) | {"reference_line": None, "points": []}
        result["left_out"] = skipped
        for p in skipped:
            log(f"left out {p['method']} at {p['target_nfe']} NFE: {p['why']}")

        def save() -> None:
            result["date"], result["wall_time_s"] = now_iso(), round(time.perf_counter() - t0, 3)
            if out is not None and main:  # under torchrun rank 0 writes
                write_json(out, result)

        if reference_method is not None:
            ref = evaluate_point(reference_method, config.reference_steps, inputs)
            result["reference_line"] = ref
            log("reference: " + _fmt(ref))
            save()
        done: dict[tuple[str, int], dict] = {}
        for method, target, steps in plan:
            key = (method.name, steps)
            if key not in done:  # two budgets that give the same steps share one draw
                done[key] = evaluate_point(method, steps, inputs)
                log(_fmt(done[key]))
            result["points"].append(done[key] | {"target_nfe": target})
            save()
    save()
    if plot is not None and main:
        plot_sweep(result, plot)
    return result


def _plan(
    model: Model,
    config: SweepConfig,
    methods: Sequence[SweepMethod],
    reference_method: SweepMethod | None,
) -> tuple[list[tuple[SweepMethod, int, int]], SweepMethod | None]:
    """[(method, target NFE, steps)] for every method x budget, and the reference method."""
    ours = [DifforgeMethod(model, s, config.guidance, config.grid) for s in config.samplers]
    all_methods = [*ours, *methods]
    names = [m.name for m in all_methods]
    if len(set(names)) != len(names):
        raise InvalidArgumentError(f"method names must be unique, got {names}")
    if reference_method is None and config.reference_sampler is not None:
        reference_method = DifforgeMethod(
            model, config.reference_sampler, config.guidance, config.grid
        )
    plan = [(m, t, steps_for_nfe(m, t)) for m in all_methods for t in config.nfe]
    return plan, reference_method


def left_out(plan: list[tuple[SweepMethod, int, int]]) -> list[dict[str, Any]]:
    """The points of `plan` on a grid where their difforge sampler is known to fail (Heun at
    <= 5 Karras steps: `difforge.samplers.advice`), with the reason; a sweep does not draw them."""
    out = []
    for m, target, steps in plan:
        if isinstance(m, DifforgeMethod):
            grid = get_sigmas(m._settings(steps)["grid"], steps, process=m.model.process)
            why = few_step_problem(m.sampler, grid)
            if why is not None:
                out.append({"method": m.name, "target_nfe": target, "steps": steps, "why": why})
    return out


def _inputs(
    model: Model,
    config: SweepConfig,
    extractor: FeatureExtractor | None,
    reference: ReferenceStats | None,
) -> PointInputs:
    if reference is None:
        check_trained_on_mnist(model)
    extractor = extractor or load_feature_extractor()
    reference = reference or default_reference(config.reference_split, extractor, config.cache_dir)
    check_model_fits(model, extractor, config.n, reference.feature_dim)
    labels = make_labels(config.labels, config.n, model.num_classes, config.seed)
    seeds = image_seeds(config.seed, config.n)
    return PointInputs(labels, seeds, extractor, reference, config.seed, config.batch_size)


def plot_sweep(result: Mapping[str, Any], path: str | Path) -> Path:
    """FID (log scale) and KID against NFE, one line per method, the reference dotted; a PNG.

    Uses matplotlib's object API with the Agg canvas, so it never touches pyplot's global state.
    """
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    ref = result.get("reference_line")
    colors = matplotlib.colormaps["tab20"]  # the 10 dark hues first, then the 10 light ones
    by_method: dict[str, list[dict]] = {}
    for p in result["points"]:
        by_method.setdefault(p["method"], []).append(p)
    for ax, key, label in ((axes[0], "fid", "FID"), (axes[1], "kid_mean", "KID")):
        for i, (name, pts) in enumerate(by_method.items()):
            pts = sorted({p["nfe"]: p for p in pts}.values(), key=lambda p: p["nfe"])
            ours = pts[0]["family"] == "difforge"
            ax.plot(
                [p["nfe"] for p in pts], [p["metrics"][key] for p in pts], "-" if ours else "--",
                marker="o" if ours else "s", ms=4, color=colors(2 * i % 20 + i // 10 % 2),
                label=name,
            )  # fmt: skip
        if ref is not None:
            ax.axhline(
                ref["metrics"][key], color="black", ls=":", lw=1.5,
                label=f"reference: {ref['method']} {ref['steps']} steps ({ref['nfe']} NFE)",
            )  # fmt: skip
        ax.set_xscale("log")
        if key == "fid":  # KID is unbiased and can dip below 0, so its axis stays linear
            ax.set_yscale("log")
        nfes = sorted({p["nfe"] for p in result["points"]})
        ax.set_xticks(nfes, [str(v) for v in nfes])
        ax.minorticks_off()
        ax.set_xlabel("NFE (denoiser evaluations per image)")
        ax.set_ylabel(f"{label} (lower is better)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    m = result["model"]
    fig.suptitle(
        f"{m['name']} ({m['sha256'][:12]}): quality vs NFE, n = {result['num_samples']}, "
        f"extractor {result['extractor']['name']}"
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
