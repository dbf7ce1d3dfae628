"""A torchrun entry point for the non-finite test: difforge's CLI, except that rank 1's loss is
NaN at step NAN_AT_STEP (rank 0's is finite): every rank must skip that step together."""

from __future__ import annotations

import os
import sys

import torch

from difforge.cli import main
from difforge.training import loop

NAN_AT = int(os.environ["DIFFORGE_TEST_NAN_AT_STEP"])
_loss = loop.denoising_loss
_step = loop.Trainer.train_step
_current: list[loop.Trainer] = []


def _train_step(self, x0, fields):
    _current[:] = [self]
    return _step(self, x0, fields)


def _nan_on_rank_1(denoiser, x0, sigma, eps, cond, config):
    loss = _loss(denoiser, x0, sigma, eps, cond, config)
    trainer = _current[0]
    if (
        trainer.world.rank == 1
        and trainer.state.step == NAN_AT
        and not trainer.state.nonfinite_total
    ):
        return loss * torch.tensor(float("nan"))
    return loss


loop.denoising_loss = _nan_on_rank_1
loop.Trainer.train_step = _train_step
main(sys.argv[1:])
