"""Training speed as users compare it with YOLOv5: images per second of the training loop, and what validation
costs beside it."""

from __future__ import annotations

import time

from pytorch_lightning import Callback


class TrainingSpeed(Callback):
    """Logs per epoch `train/images_per_s` (all processes together, training batches only), `train/seconds`,
    `train/data_wait_share` and `val/seconds` (`test/seconds` in `test`). Lightning validates inside the training
    epoch (at its end, and mid-epoch with `val_check_interval` < 1), so validation time is taken out of the training
    figures. Under DDP each figure is the mean over the processes.

    `train/data_wait_share` is the share of the training time the loop spent between one batch's end and the next
    one's start, i.e. waiting for the loader (and the copy to the device): near 0 when the model is the bottleneck;
    large when more loader workers (or a faster input pipeline) would speed training up and a faster model or
    precision would not.
    """

    def __init__(self) -> None:
        self._start: float | None = None
        self._images = 0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images, self._waiting, self._validating = time.perf_counter(), 0, 0.0, 0.0
        self._last_batch_end = self._start

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._start is None:  # a run resumed mid-epoch starts without on_train_epoch_start
            self.on_train_epoch_start(trainer, pl_module)
        if self._images:  # from the second batch on: the first one's wait holds worker start-up or a pruning step
            self._waiting += time.perf_counter() - self._last_batch_end

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch["images"])
        self._last_batch_end = time.perf_counter()

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._validation_start = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        seconds = time.perf_counter() - self._validation_start
        pl_module.log("val/seconds", seconds, sync_dist=True)
        if self._start is not None:  # inside a training epoch: neither training time nor waiting for data
            self._validating += seconds
            self._last_batch_end += seconds

    def on_test_epoch_start(self, trainer, pl_module) -> None:
        self._test_start = time.perf_counter()

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        pl_module.log("test/seconds", time.perf_counter() - self._test_start, sync_dist=True)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        seconds = self._last_batch_end - self._start - self._validating
        pl_module.log("train/seconds", seconds, sync_dist=True)
        pl_module.log("train/images_per_s", self._images * trainer.world_size / seconds, sync_dist=True)
        pl_module.log("train/data_wait_share", self._waiting / seconds, sync_dist=True)
        self._start = None
