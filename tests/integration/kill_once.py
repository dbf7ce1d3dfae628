"""A torchrun entry point for the elastic-restart test: difforge's CLI, except that on the first
attempt rank 1 kills itself with SIGKILL (no cleanup, as an OOM kill or a lost node would) right
after the step-KILL_AT checkpoint. torchrun --max-restarts 1 must then restart the group."""

from __future__ import annotations

import os
import signal
import sys

from difforge.cli import main
from difforge.training.loop import Trainer

KILL_AT = int(os.environ["DIFFORGE_TEST_KILL_AT_STEP"])
_save = Trainer.save_checkpoint


def _save_then_die(self: Trainer):
    path = _save(self)
    if self.world.rank == 1 and self.world.restart == 0 and self.state.step == KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
    return path


Trainer.save_checkpoint = _save_then_die
main(sys.argv[1:])
