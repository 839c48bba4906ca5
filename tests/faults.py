"""Fault injection for tests/test_faults.py: callbacks that break a run at an exact epoch and batch."""

import os

import torch
from pytorch_lightning import Callback


class SignalAt(Callback):
    """Sends `signum` to this process after training batch `batch` of epoch `epoch` (15: SIGTERM, 9: kill -9); with
    `rank`, only the process of that global rank does (under DDP: `kill` of one process, as a user would); with
    `group`, to its whole process group, loader workers included (`kill -- -PGID`, `timeout`, SLURM, systemd); `times`
    times in a row."""

    def __init__(self, epoch: int, batch: int, signum: int, rank: int | None = None, group: bool = False,
                 times: int = 1):
        self.epoch, self.batch, self.signum, self.rank, self.group = epoch, batch, signum, rank, group
        self.times = times

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.rank not in (None, trainer.global_rank):
            return
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            for _ in range(self.times):
                if self.group:
                    os.killpg(os.getpgid(0), self.signum)
                else:
                    os.kill(os.getpid(), self.signum)


class PoisonWeights(Callback):
    """Sets the first convolution's weights to NaN before batch `batch` of epoch `epoch`: a diverged model."""

    def __init__(self, epoch: int, batch: int):
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            with torch.no_grad():
                pl_module.model.model[0].conv.weight.fill_(float("nan"))


class BrokenAutocast(Callback):
    """Makes the first convolution return NaN under CPU autocast: a device whose mixed precision is broken."""

    def setup(self, trainer, pl_module, stage):
        def hook(module, inputs, output):
            return output * float("nan") if torch.is_autocast_enabled("cpu") else output

        pl_module.model.model[0].conv.register_forward_hook(hook)
