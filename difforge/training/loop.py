"""The training loop: one `Trainer` that owns the net, optimizer, EMA, RNGs and data order.

Resume is exact on the CPU: a checkpoint holds every piece of state a step reads (weights,
optimizer moments, EMA, all RNG states, the epoch and position in the data order, counters), and the
learning rate is a pure function of the step. So 2N steps equal N steps + resume + N steps, bit for
bit. A step whose loss or gradient is non-finite changes nothing but the counters.
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from difforge.common.distributed import World, current
from difforge.core.errors import DifforgeError, InvalidArgumentError
from difforge.core.processes import make_process
from difforge.data.dataset import ImageDataset
from difforge.data.timeseries import SeriesDataset
from difforge.pipeline import Model, build_denoiser, build_network, load_weights_strict
from difforge.training import checkpoint as ckpt
from difforge.training import distributed as ddp
from difforge.training.config import TrainConfig, config_diff
from difforge.training.export import (
    check_text_net,
    export_model,
    export_pipeline,
    model_config_for,
    plot_loss_curve,
    sample_grid,
    text_spec,
    training_pipeline,
    truncate_metrics,
)
from difforge.training.losses import denoising_loss, sample_sigma
from difforge.training.optim import (
    EMA,
    build_optimizer,
    ema_beta,
    load_optimizer_state,
    lr_at,
    optimizer_state,
)
from difforge.training.runlock import run_lock


class NonFiniteTrainingError(DifforgeError):
    """Too many steps in a row had a non-finite loss or gradient."""


@dataclass
class TrainState:
    """The loop's counters; JSON in every checkpoint."""

    step: int = 0  # optimizer updates done
    epoch: int = 0  # pass over the data the next batch comes from
    position: int = 0  # index into that epoch's permutation
    images_seen: int = 0  # by optimizer updates (drives the EMA ramp)
    nonfinite_total: int = 0
    nonfinite_streak: int = 0
    window_loss: float = 0.0  # sum of losses since the last log line
    window_steps: int = 0
    last_loss: float | None = None  # mean loss of the last log window
    elapsed_s: float = 0.0  # wall time spent training, over all resumes


@dataclass(frozen=True)
class StepOutcome:
    loss: float
    grad_norm: float
    skipped: bool


@dataclass(frozen=True)
class TrainResult:
    """How a `train` call ended."""

    status: str  # "completed", "stopped" (until_step), "time_budget" or "interrupted"
    step: int
    loss: float | None  # mean loss of the last log window
    run_dir: Path
    model_dir: Path | None  # None when interrupted
    checkpoint: Path | None
    nonfinite_total: int
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)


def _info(message: str) -> None:
    tqdm.write(message, file=sys.stderr)


def _load_init(net: torch.nn.Module, folder: str, mode: str = "exact") -> tuple[str, dict]:
    """Load a model folder's denoiser weights into net; returns (their sha256, what was loaded).

    mode "exact": strict, every tensor. "matching": the tensors whose name and shape fit (a bare
    backbone's names are looked up under the net's `backbone.` prefix too); at least one must."""
    from difforge.pipeline.artifact import load_component

    path = Path(folder)
    sub = path / "denoiser" if (path / "denoiser").is_dir() else path
    _, _, sha, weights = load_component(sub, "denoiser")
    if mode == "exact":
        try:
            net.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            raise InvalidArgumentError(f"init {folder}: weights do not fit the net: {e}") from None
        return sha, {"mode": mode, "loaded": len(weights), "skipped": 0, "fresh": 0}
    own = net.state_dict()
    prefix = "" if any(k in own for k in weights) else "backbone."
    fit = {
        prefix + k: v
        for k, v in weights.items()
        if prefix + k in own and own[prefix + k].shape == v.shape
    }
    if not fit:
        raise InvalidArgumentError(f"init {folder}: no tensor's name and shape fit the net")
    net.load_state_dict(fit, strict=False)
    return sha, {
        "mode": mode,
        "loaded": len(fit),
        "skipped": len(weights) - len(fit),  # in the source, not used
        "fresh": len(own) - len(fit),  # in the net, left at their initialisation
    }


class Trainer:
    """Trains `config` on `dataset`, writing checkpoints, metrics and artifacts into `run_dir`.

    Args:
        config: the training recipe.
        dataset: images uint8 (N, C, H, W) or series float32 (N, C, T), with int64 labels (or
            None: unconditional).
        run_dir: the run folder.
        log: where human-readable messages go.
        world: the torchrun group to train data-parallel in [the current one]; see
            difforge.training.distributed for how a step splits over the ranks.
    """

    def __init__(
        self,
        config: TrainConfig,
        dataset: ImageDataset | SeriesDataset,
        run_dir: str | Path,
        *,
        log: Callable[[str], None] = _info,
        world: World | None = None,
    ):
        self.world = world if world is not None else current()
        ddp.check_batch(config.batch_size, self.world)
        if config.batch_size > len(dataset):
            raise InvalidArgumentError(
                f"batch_size {config.batch_size} exceeds the dataset's {len(dataset)} images"
            )
        self.config, self.dataset, self.log = config, dataset, log
        self.run_dir = Path(run_dir)
        self.process = make_process(config.process)
        self.model_config = model_config_for(config, dataset, self.run_dir.name)
        self.text_spec = text_spec(config, dataset)  # a captioned data set: prompts
        # what cond training feeds: the config's spec, the text spec, or the dataset's labels (v1)
        self.spec = (
            config.conditioning
            or self.text_spec
            or self.model_config.conditioning(config.cond_dropout)
        )
        self.latents = None  # a LatentSource when training in a VAE's latent space
        if config.vae:
            from difforge.training.vae import encoded_dataset

            self.latents = encoded_dataset(config.vae, dataset)
            self.data = self.latents.latents  # (N, c, h, w), scaled
        else:
            self.data = dataset.as_float()  # (N, C, H, W) in [-1, 1], or series (N, C, T)
        self.fields = dataset.fields()  # {name: (N, ...)} per-example data the spec reads
        torch.manual_seed(config.seed)
        np.random.seed(config.seed % 2**32)
        random.seed(config.seed)
        self.net = build_network(config.net)
        if config.init:
            self.init_sha256, self.init_report = _load_init(self.net, config.init, config.init_mode)
        _check_net_fits(self.net, self.model_config)
        check_text_net(self.net.config, self.text_spec)
        self.layout = _load_layout(config.layout, self.spec)  # (config, net, sha, weights)
        self.denoiser = build_denoiser(self.model_config, self.net).train()
        # what training calls: under torchrun the same adapter around the DDP-wrapped net (DDP
        # hooks the net's forward; the adapter's loss_terms calls it)
        self.forward = self.denoiser
        if self.world.distributed:
            self.forward = build_denoiser(self.model_config, ddp.wrap(self.net, self.world))
        self.optimizer = build_optimizer(self.net.parameters(), config)
        self.ema = EMA(self.net)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.state = TrainState()
        self._perm: tuple[int, Tensor] | None = None
        self._sampler_model: Model | None = None

    # --- data order ---------------------------------------------------------------------------

    def _permutation(self, epoch: int) -> Tensor:
        """The epoch's data order: a function of (seed, epoch) only, so resume needs no state."""
        if self._perm is None or self._perm[0] != epoch:
            seed = int(np.random.SeedSequence([self.config.seed, epoch]).generate_state(1)[0])
            g = torch.Generator().manual_seed(seed)
            self._perm = (epoch, torch.randperm(len(self.data), generator=g))
        return self._perm[1]

    def next_batch(self) -> tuple[Tensor, dict[str, Tensor]]:
        """(x0 (B, *sample_shape) float32, the batch's data fields); the last partial batch is dropped.

        B is the global batch: every rank gets all of it; `train_step` keeps its shard.
        """
        b, s = self.config.batch_size, self.state
        if s.position + b > len(self.data):
            s.epoch, s.position = s.epoch + 1, 0
        idx = self._permutation(s.epoch)[s.position : s.position + b]
        s.position += b
        return self.data[idx], {name: v[idx] for name, v in self.fields.items()}

    # --- one step -----------------------------------------------------------------------------

    def train_step(self, x0: Tensor, fields: dict[str, Tensor]) -> StepOutcome:
        """One AdamW step on one global batch; a non-finite loss or gradient (on any rank) leaves
        all weights as they were."""
        cfg, s = self.config, self.state
        lr = lr_at(cfg, s.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        sigma = sample_sigma(cfg, self.process, x0.shape[0], self.generator)  # (B,)
        eps = torch.randn(x0.shape, generator=self.generator)  # (B, C, H, W) or (B, C, T)
        cond = self.spec.drop(self.spec.from_batch(fields), self.generator)  # CFG dropout
        x0, sigma, eps, cond = ddp.shard(self.world, x0, sigma, eps, cond)  # this rank's rows
        autocast = (
            torch.autocast("cpu", dtype=torch.bfloat16)
            if cfg.precision == "bf16"
            else nullcontext()
        )
        with autocast:
            loss = denoising_loss(self.forward, x0, sigma, eps, cond, cfg)
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = float(self.world.mean(loss.detach()))  # the global batch's mean loss
        if not math.isfinite(loss_value):
            return self._skip(loss_value, math.nan)
        loss.backward()  # under DDP: gradients averaged over the ranks
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.net.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            return self._skip(loss_value, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        s.step += 1
        s.images_seen += cfg.batch_size
        self.ema.update(self.net, ema_beta(cfg, s.images_seen))
        s.nonfinite_streak = 0
        s.window_loss += loss_value
        s.window_steps += 1
        return StepOutcome(loss_value, grad_norm, skipped=False)

    def _skip(self, loss: float, grad_norm: float) -> StepOutcome:
        self.optimizer.zero_grad(set_to_none=True)
        s = self.state
        s.nonfinite_total += 1
        s.nonfinite_streak += 1
        self.log(
            f"step {s.step}: non-finite {'loss' if not math.isfinite(loss) else 'gradient'}; "
            f"skipped ({s.nonfinite_streak} in a row, {s.nonfinite_total} in total)"
        )
        if s.nonfinite_streak >= self.config.max_nonfinite:
            raise NonFiniteTrainingError(
                f"stopped at step {s.step}: {s.nonfinite_streak} steps in a row had a non-finite "
                "loss or gradient; lower optim.lr, enable optim.grad_clip, or check the data"
            )
        return StepOutcome(loss, grad_norm, skipped=True)

    # --- checkpoints --------------------------------------------------------------------------

    def checkpoint_payload(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """(tensors, JSON state) capturing everything the next step depends on."""
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        tensors |= {f"ema.{k}": v for k, v in self.ema.net.state_dict().items()}
        opt_tensors, opt_meta = optimizer_state(self.optimizer)
        rng_tensors, rng_json = ckpt.rng_state(self.generator)
        state = {
            "format": ckpt.FORMAT,
            "step": self.state.step,
            "config": self.config.model_dump(mode="json"),
            "dataset": {
                "spec": self.config.dataset,
                "content_hash": self.dataset.content_hash,
                "size": len(self.dataset),
            },
            "state": asdict(self.state),
            "optimizer": opt_meta,
            "rng": rng_json,
            "lr": lr_at(self.config, self.state.step),
        }
        return tensors | opt_tensors | rng_tensors, state

    def save_checkpoint(self) -> Path:
        """Rank 0 writes the checkpoint (every rank holds the same state); all return its path."""
        if not self.world.is_main:
            return ckpt.checkpoint_dir(self.run_dir) / f"step-{self.state.step:09d}"
        tensors, state = self.checkpoint_payload()
        return ckpt.write_checkpoint(
            self.run_dir, self.state.step, tensors, state, self.config.keep_last
        )

    def restore(self, path: Path, *, force: bool = False) -> None:
        """Continue from checkpoint `path`; refuse a different config or dataset unless `force`."""
        tensors, state = ckpt.read_checkpoint(path)
        self._check_compatible(state, path, force)
        load_weights_strict(self.net, ckpt.subset(tensors, "net."), f"{path} (net)")
        load_weights_strict(self.ema.net, ckpt.subset(tensors, "ema."), f"{path} (ema)")
        load_optimizer_state(self.optimizer, tensors, state["optimizer"])
        ckpt.set_rng_state(self.generator, tensors, state["rng"])
        self.state = TrainState(**state["state"])
        self._perm = None

    def _check_compatible(self, state: dict[str, Any], path: Path, force: bool) -> None:
        problems = config_diff(state["config"], self.config.model_dump(mode="json"))
        old_hash = state["dataset"]["content_hash"]
        if old_hash != self.dataset.content_hash:
            problems.append(f"dataset content hash: {old_hash} -> {self.dataset.content_hash}")
        if not problems:
            return
        listing = "; ".join(problems)
        if not force:
            raise ckpt.CheckpointError(
                f"cannot resume from {path}: the run differs from the checkpoint ({listing}); "
                "pass --force to resume anyway, or use a new --out"
            )
        self.log(f"resuming despite differences (forced): {listing}")

    # --- the loop -----------------------------------------------------------------------------

    def run(
        self,
        *,
        max_minutes: float | None = None,
        until_step: int | None = None,
        progress: bool = True,
    ) -> TrainResult:
        """Train until max_steps (or `until_step`), the wall budget, or SIGINT/SIGTERM.

        Every ending writes a checkpoint; all but an interruption also export the model folder.
        """
        start = time.monotonic()
        deadline = None if max_minutes is None else start + 60.0 * max_minutes
        cfg = self.config
        last = cfg.max_steps if until_step is None else min(until_step, cfg.max_steps)
        status = "completed" if last == cfg.max_steps else "stopped"
        window_start = start
        bar = tqdm(
            total=cfg.max_steps,
            initial=self.state.step,
            unit="step",
            disable=not (progress and self.world.is_main),
            dynamic_ncols=True,
            file=sys.stderr,
        )
        with bar, _stop_on_signals() as stop:
            while self.state.step < last:
                late = deadline is not None and time.monotonic() >= deadline
                interrupted, late = self.world.any(stop.is_set(), late)  # every rank stops together
                if interrupted or late:
                    status = "interrupted" if interrupted else "time_budget"
                    break
                outcome = self.train_step(*self.next_batch())
                if outcome.skipped:
                    continue
                bar.update(1)
                if self.state.step % cfg.log_every == 0:
                    now = time.monotonic()
                    self._log_metrics(outcome, now - window_start, bar)
                    window_start = now
                self._periodic_outputs()
        self.state.elapsed_s += time.monotonic() - start
        return self._finish(status, time.monotonic() - start)

    def _log_metrics(self, outcome: StepOutcome, seconds: float, bar: tqdm) -> None:
        s = self.state
        s.last_loss = s.window_loss / max(s.window_steps, 1)
        row = {
            "step": s.step,
            "loss": s.last_loss,
            "lr": lr_at(self.config, s.step - 1),
            "grad_norm": outcome.grad_norm,
            "ema_beta": ema_beta(self.config, s.images_seen),
            "epoch": s.epoch,
            "images_seen": s.images_seen,
            "nonfinite_total": s.nonfinite_total,
            "sec_per_step": seconds / max(s.window_steps, 1),
            "time": time.time(),
        }
        s.window_loss, s.window_steps = 0.0, 0
        bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
        if not self.world.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    def _periodic_outputs(self) -> None:
        step, cfg = self.state.step, self.config
        if cfg.sample_every and step % cfg.sample_every == 0 and self.world.is_main:
            self.write_sample_grid(self.run_dir / "samples" / f"step-{step:09d}.png")
        if step % cfg.checkpoint_every == 0:
            self.save_checkpoint()

    def write_sample_grid(self, path: Path) -> Path:
        """A labelled grid from the current EMA weights; touches no training RNG."""
        if self._sampler_model is None:
            pipeline = None
            if self.text_spec is not None:
                pipeline = training_pipeline(self.model_config, self.text_spec)
            layout = {}
            if self.layout is not None:
                layout = {"layout": self.layout[1], "layout_config": self.layout[0]}
            self._sampler_model = Model(
                self.model_config, self.ema.net, sha256="(training)", pipeline=pipeline, **layout
            )
        with torch.random.fork_rng(devices=[]):
            return sample_grid(self._sampler_model, path)

    def _finish(self, status: str, seconds: float) -> TrainResult:
        checkpoint = self.save_checkpoint()
        model_dir = None
        if status != "interrupted":
            model_dir = self.run_dir / "model"
            if self.world.is_main:
                self.export(model_dir)
                plot_loss_curve(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        self.world.barrier()  # rank 0's files exist before any rank returns
        s = self.state
        return TrainResult(
            status,
            s.step,
            s.last_loss,
            self.run_dir,
            model_dir,
            checkpoint,
            s.nonfinite_total,
            seconds,
        )

    def export(self, folder: Path) -> Path:
        """Write the model folder from the EMA weights."""
        from difforge.nets import count_parameters

        s = self.state
        provenance = {
            "dataset": self.config.dataset,
            "dataset_hash": self.dataset.content_hash,
            "dataset_size": len(self.dataset),
            "step": s.step,
            "images_seen": s.images_seen,
            "final_loss": s.last_loss,
            "nonfinite_total": s.nonfinite_total,
            "parameters": count_parameters(self.net),
            "train_seconds": round(s.elapsed_s, 1),
        }
        if self.latents is not None:
            provenance["vae_sha256"] = self.latents.sha256
            provenance["latent_encode_seconds"] = round(
                self.latents.seconds, 1
            )  # not in train_seconds
        if self.config.init:
            provenance["init_sha256"] = self.init_sha256  # the denoiser weights it started from
            if self.config.init_mode != "exact":
                provenance["init"] = self.init_report
        layout = None
        if self.layout is not None:
            provenance["layout_sha256"] = self.layout[2]
            layout = (self.layout[0], self.layout[3])
        weights = self.ema.net.state_dict()
        if self.config.conditioning is None and self.latents is None and layout is None:
            return export_model(
                folder, self.model_config, self.config, weights, provenance, self.text_spec
            )
        return export_pipeline(
            folder, self.model_config, self.config, weights, provenance, self.spec, self.latents,
            layout,
        )  # fmt: skip


def _load_layout(path: str | None, spec) -> tuple | None:
    """The layout planner component a planned-slots text model is trained with (None: none)."""
    if not path:
        return None
    from difforge.pipeline.artifact import load_component
    from difforge.pipeline.layout import check_layout

    config, net, sha, weights = load_component(path, "layout")
    check_layout(spec, config, path)
    return config, net, sha, weights


def _check_net_fits(net: torch.nn.Module, model_config) -> None:
    """The net's declared input, image size (or series length) and classes must match the dataset."""
    shape = tuple(model_config.image_shape)  # (C, H, W) or (C, T)
    cfg = getattr(net, "config", None)
    size = "image_size" if len(shape) == 3 else "length"
    other = "length" if size == "image_size" else "image_size"
    if cfg is not None and hasattr(cfg, other) and not hasattr(cfg, size):
        what = "images (C, H, W)" if size == "image_size" else "series (C, T)"
        raise InvalidArgumentError(
            f"network does not fit the dataset: net kind {getattr(net, 'kind', '?')!r} takes "
            f"{'series' if other == 'length' else 'images'}, the dataset holds {what} {shape}"
        )
    checks = [
        ("in_channels", shape[0]),
        (size, shape[1]),
        ("num_classes", model_config.num_classes),
    ]
    wrong = [
        f"net.config.{name} is {getattr(cfg, name)} but the dataset has {want}"
        for name, want in checks
        if cfg is not None and hasattr(cfg, name) and getattr(cfg, name) != want
    ]
    if wrong:
        raise InvalidArgumentError("network does not fit the dataset: " + "; ".join(wrong))


@contextmanager
def _stop_on_signals() -> Iterator[threading.Event]:
    """SIGINT/SIGTERM set an event (the loop then checkpoints and stops); a second SIGINT aborts."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):
        if stop.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def load_training_data(spec: str | dict[str, Any]) -> ImageDataset | SeriesDataset:
    """The image or series dataset a config names (`difforge.data.load_dataset`)."""
    from difforge.data import load_dataset

    dataset = load_dataset(spec)
    if not isinstance(dataset, ImageDataset | SeriesDataset):
        raise InvalidArgumentError(
            f"dataset {json.dumps(spec)} is neither images nor series; training needs one of them"
        )
    return dataset


def describe(
    config: TrainConfig, dataset: ImageDataset | SeriesDataset | None = None
) -> dict[str, Any]:
    """What `--dry-run` prints: the dataset, the net's size and its cost per forward and step.

    Builds the net and loads the dataset, so any config error surfaces here without training.
    """
    from difforge.pipeline import network_cost

    dataset = dataset if dataset is not None else load_training_data(config.dataset)
    model_config = model_config_for(config, dataset, "dry-run")
    with torch.random.fork_rng(devices=[]):
        net = build_network(config.net)
    _check_net_fits(net, model_config)
    params, flops = network_cost(net, model_config.image_shape, model_config.conditioning())
    return {
        "dataset": config.dataset,
        "dataset_size": len(dataset),
        "dataset_hash": dataset.content_hash,
        "image_shape": list(model_config.image_shape),
        "num_classes": model_config.num_classes,
        "net": config.net.kind,
        "parameters": params,
        "flops_per_forward": flops,
        # forward + backward ~ 3 forwards (Kaplan et al. 2020, Sec. 2.1)
        "flops_per_step": 3 * flops * config.batch_size,
        "parameterization": config.parameterization,
        "max_steps": config.max_steps,
        "batch_size": config.batch_size,
    }


def train(
    config: TrainConfig,
    run_dir: str | Path,
    *,
    dataset: ImageDataset | SeriesDataset | None = None,
    resume: bool = False,
    force: bool = False,
    max_minutes: float | None = None,
    until_step: int | None = None,
    progress: bool = True,
    log: Callable[[str], None] = _info,
    world: World | None = None,
) -> TrainResult:
    """Train a model, or continue a run, and write its artifacts into `run_dir`.

    Under torchrun every rank calls this inside `difforge.common.distributed.session()`: the run
    is data-parallel and rank 0 writes the files (difforge.training.distributed).

    Args:
        config: the training recipe.
        run_dir: the run folder (checkpoints/, metrics.jsonl, samples/, loss.png, model/).
        dataset: use this dataset instead of loading `config.dataset` (its hash still counts).
        resume: continue from the newest complete checkpoint in run_dir.
        force: resume even if the config or the dataset's content hash changed.
        max_minutes: wall-clock budget; on expiry, checkpoint, export and stop cleanly.
        until_step: stop (checkpoint and export) after this step, before max_steps.
        progress: show a tqdm progress bar.
        world: the torchrun group [the current one]; a restart of the group resumes.

    Returns:
        TrainResult: how it ended, the final step and loss, and where the model is.
    """
    run_dir = Path(run_dir)
    if max_minutes is not None and not max_minutes > 0:
        raise InvalidArgumentError(f"max_minutes must be positive, got {max_minutes}")
    world = world if world is not None else current()
    resume = ddp.resume_on_restart(resume, world)
    # one trainer per run folder; under torchrun rank 0 holds the lock for the whole group (the
    # other ranks write nothing), so a second launch on the same --out fails on its rank 0
    with run_lock(run_dir) if world.is_main else nullcontext():
        return _train_locked(
            config, run_dir, dataset, resume, force, max_minutes, until_step, progress, log, world
        )


def _train_locked(
    config, run_dir, dataset, resume, force, max_minutes, until_step, progress, log, world
):
    existing = ckpt.list_checkpoints(run_dir)
    if existing and not resume:
        raise InvalidArgumentError(
            f"{run_dir} already holds checkpoints; pass --resume to continue it or choose a new --out"
        )
    if world.is_main:
        ckpt.remove_debris(run_dir)  # under the lock, every temp or unmarked folder is a leftover
    dataset = dataset if dataset is not None else load_training_data(config.dataset)
    trainer = Trainer(config, dataset, run_dir, log=log, world=world)
    latest = ckpt.latest_checkpoint(run_dir) if resume else None
    if latest is not None:
        trainer.restore(latest, force=force)
        ddp.check_same_step(trainer.state.step, world)
        if world.is_main:
            truncate_metrics(run_dir / "metrics.jsonl", trainer.state.step)
            log(f"resumed from {latest} (step {trainer.state.step})")
    elif resume and existing:
        raise ckpt.CheckpointError(f"{run_dir} holds no complete checkpoint to resume from")
    if world.is_main:
        (run_dir / "config.json").write_text(config.to_json() + "\n")
    return trainer.run(max_minutes=max_minutes, until_step=until_step, progress=progress)
