"""The training recipe: one typed, frozen config, stored as JSON next to every checkpoint.

Each choice is one `Literal` field; a bad value is an error that lists the allowed ones. Runtime
options that do not change the result (wall-clock budget, progress bar) are not part of it, so a run
stopped by `--max-minutes` resumes under the same config.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from difforge.common.validation import error_line
from difforge.core.errors import InvalidArgumentError
from difforge.core.processes import make_process
from difforge.pipeline import ConditioningSpec, NetSpec, SamplingDefaults

Parameterization = Literal["eps", "x0", "v", "velocity", "edm"]
PARAMETERIZATIONS: tuple[str, ...] = ("eps", "x0", "v", "velocity", "edm")
LossWeighting = Literal["native", "min_snr", "edm"]
NoiseDistribution = Literal["uniform_t", "log_normal", "logit_normal"]
LRSchedule = Literal["constant", "cosine", "linear", "rsqrt"]
Precision = Literal["fp32", "bf16"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class OptimConfig(_Frozen):
    """AdamW (Loshchilov & Hutter 2019) with linear warmup, then `schedule` down to `min_lr_ratio`."""

    lr: float = Field(1e-3, gt=0)  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)  # linear ramp 0 -> lr over these optimizer steps
    # After warmup: cosine/linear decay until max_steps, or rsqrt = lr / sqrt(max(1, step /
    # decay_steps)) (Karras et al. 2024, EDM2 Eq. 16), which needs no budget, so a run resumed
    # past its first stop follows the same curve.
    schedule: LRSchedule = "constant"
    decay_steps: int = Field(1000, ge=1)  # rsqrt: steps before the decay starts
    min_lr_ratio: float = Field(0.0, ge=0, le=1)  # floor of the decay, as a fraction of lr
    grad_clip: float = Field(1.0, ge=0)  # max global grad norm; 0 disables clipping


class EMAConfig(_Frozen):
    """EMA of the weights with a half-life counted in training images (Karras et al. 2022, App. C).

    beta = 0.5 ** (batch_size / h) per step, with h = min(halflife_images, rampup_ratio * images
    seen so far), so early on the average forgets the random initialisation quickly.
    """

    halflife_images: float = Field(5000.0, gt=0)
    rampup_ratio: float | None = Field(0.05, gt=0)  # None: fixed half-life from the first step


class TrainConfig(_Frozen):
    """Everything that determines a training run's result, bit for bit on the CPU."""

    net: NetSpec = Field(default_factory=NetSpec)
    # A `difforge.data.load_dataset` spec: "mnist:train" or {"kind": "folder", "path": ...}.
    dataset: str | dict[str, Any] = "mnist:train"
    process: dict[str, Any] = Field(default_factory=lambda: {"kind": "ve"})  # `make_process` dict
    # What the network predicts; "edm" = EDMPrecond (Karras et al. 2022, Eq. 7) on a VE process.
    parameterization: Parameterization = "edm"
    sigma_data: float = Field(0.5, gt=0)  # data std for EDM preconditioning and weighting
    # Loss weight lambda(sigma) in x0 space: native = the prediction's own MSE; min_snr =
    # min(SNR, gamma) (Hang et al. 2023, Eq. 9); edm = (sigma^2 + sd^2) / (sigma sd)^2 (Eq. 8).
    loss_weighting: LossWeighting = "edm"
    min_snr_gamma: float = Field(5.0, gt=0)
    # Training noise levels: uniform_t = t ~ U over the process's timesteps (Ho et al. 2020);
    # log_normal = ln sigma ~ N(P_mean, P_std^2) (Karras et al. 2022, Sec. 5); logit_normal =
    # logit t ~ N(logit_mean, logit_std^2) on a flow's t (Esser et al. 2024, Sec. 3.1).
    noise_distribution: NoiseDistribution = "log_normal"
    P_mean: float = -1.2
    P_std: float = Field(1.2, gt=0)
    logit_mean: float = 0.0
    logit_std: float = Field(1.0, gt=0)
    cond_dropout: float = Field(0.1, ge=0, le=1)  # labels -> null class, for CFG (Ho & Salimans)
    # The conditioning spec (each key with its own dropout and data field); None: the dataset's
    # class labels (v1, with cond_dropout). A spec set here makes the model a v2 pipeline.
    conditioning: ConditioningSpec | None = None
    # A VAE folder (`difforge train-vae`): train on its scaled latents of the dataset, encoded
    # once; the model is then a v2 pipeline of vae/ + denoiser/. None: pixel space.
    vae: str | None = None
    # A layout planner folder (`difforge train-layout`) for a captioned-scenes text model whose
    # backbone has a slot path: the model is then conditioned on the prompt and the scene's slots
    # (a planned slots key: at sampling the planner draws them from the prompt, per image) and the
    # pipeline holds the planner as its layout/ component. None: prompts only.
    layout: str | None = None
    # A model folder whose denoiser weights start the net (fine-tuning; its EMA starts there too).
    # The net config must match; None: random initialisation.
    init: str | None = None
    # "exact": every tensor of the net, nothing else (fine-tuning). "matching": a warm start from
    # another architecture (a class U-Net into a text net's backbone): tensors whose name (under
    # the net's `backbone.` prefix when the source is a bare backbone) and shape match are loaded,
    # the rest keep their initialisation; the counts go into the provenance.
    init_mode: Literal["exact", "matching"] = "exact"
    optim: OptimConfig = Field(default_factory=OptimConfig)
    ema: EMAConfig = Field(default_factory=EMAConfig)
    precision: Precision = "fp32"  # bf16 = autocast around the network's forward
    batch_size: int = Field(64, ge=1)
    max_steps: int = Field(1000, ge=1)
    seed: int = Field(0, ge=0, lt=2**63)
    log_every: int = Field(10, ge=1)
    sample_every: int = Field(0, ge=0)  # 0: no sample grids during training
    checkpoint_every: int = Field(200, ge=1)
    keep_last: int = Field(3, ge=1)  # complete checkpoints kept on disk
    max_nonfinite: int = Field(10, ge=1)  # stop after this many non-finite steps in a row
    sampling: SamplingDefaults = Field(default_factory=SamplingDefaults)

    @model_validator(mode="after")
    def _check_combination(self) -> TrainConfig:
        process = make_process(self.process)
        if self.parameterization == "edm" and process.kind != "ve":
            raise ValueError(
                f"parameterization 'edm' needs a VE process, got process kind {process.kind!r}"
            )
        if self.noise_distribution == "logit_normal" and process.kind != "flow":
            raise ValueError("noise_distribution 'logit_normal' is for a 'flow' process")
        return self

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True)


def parse_config(data: dict[str, Any], source: str = "config") -> TrainConfig:
    """Validate a config dict; errors become one `InvalidArgumentError` naming each bad field."""
    try:
        return TrainConfig.model_validate(data)
    except ValidationError as e:
        raise InvalidArgumentError(f"{source}: {error_line(e)}") from None


def load_config(path: str | Path) -> TrainConfig:
    """Read and validate a JSON training config file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidArgumentError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise InvalidArgumentError(f"{path}: expected a JSON object")
    return parse_config(data, str(path))


def config_diff(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Readable differences between two JSON configs: ['optim.lr: 0.001 -> 0.002', ...]."""
    lines = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        a, b = old.get(key, "<unset>"), new.get(key, "<unset>")
        if isinstance(a, dict) and isinstance(b, dict):
            lines += config_diff(a, b, name + ".")
        elif a != b:
            lines.append(f"{name}: {json.dumps(a)} -> {json.dumps(b)}")
    return lines
