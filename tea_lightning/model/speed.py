"""Training speed as users compare it with YOLOv5: images per second of the training loop, per epoch."""

from __future__ import annotations

import time

from pytorch_lightning import Callback


class TrainingSpeed(Callback):
    """Logs `train/images_per_s` (all processes together, validation excluded) at the end of every epoch."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += len(batch["images"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        rate = self._images * trainer.world_size / (time.perf_counter() - self._start)
        pl_module.log("train/images_per_s", rate, on_epoch=True, rank_zero_only=True)
