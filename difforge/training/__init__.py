"""difforge.training: the recipe (config), losses and noise levels, the loop, EMA, checkpoints."""

from difforge.training.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    write_checkpoint,
)
from difforge.training.config import (
    PARAMETERIZATIONS,
    EMAConfig,
    OptimConfig,
    TrainConfig,
    config_diff,
    load_config,
    parse_config,
)
from difforge.training.loop import (
    NonFiniteTrainingError,
    Trainer,
    TrainResult,
    TrainState,
    describe,
    load_training_data,
    train,
)
from difforge.training.losses import denoising_loss, sample_sigma, x0_weighting
from difforge.training.optim import EMA, ema_beta, lr_at

__all__ = [
    "EMA",
    "PARAMETERIZATIONS",
    "CheckpointError",
    "EMAConfig",
    "NonFiniteTrainingError",
    "OptimConfig",
    "TrainConfig",
    "TrainResult",
    "TrainState",
    "Trainer",
    "config_diff",
    "denoising_loss",
    "describe",
    "ema_beta",
    "latest_checkpoint",
    "list_checkpoints",
    "load_config",
    "load_training_data",
    "lr_at",
    "parse_config",
    "read_checkpoint",
    "sample_sigma",
    "train",
    "write_checkpoint",
    "x0_weighting",
]
