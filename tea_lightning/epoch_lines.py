"""One plain line per epoch for logs that are not a terminal."""

from __future__ import annotations

import sys
import time

from pytorch_lightning import Callback

# (label, metric, format) in the order YOLOv5's train.py prints them: losses, then the validation's scores
FIGURES = [("box", "train/box_loss", "{:.4f}"), ("obj", "train/obj_loss", "{:.4f}"),
           ("cls", "train/cls_loss", "{:.4f}"), ("mAP50", "val/mAP50", "{:.4f}"), ("mAP50-95", "val/mAP50-95", "{:.4f}"),
           ("P", "val/precision", "{:.3f}"), ("R", "val/recall", "{:.3f}")]


class EpochLines(Callback):
    """Prints a line per training epoch (its losses and its validation's mAP, precision and recall) when standard
    output is not a terminal: Lightning's progress bar writes nothing to a file until training ends, so a batch job's
    log (SLURM, nohup) would show no progress for hours. In a terminal the progress bar shows the same figures."""

    def __init__(self, stream=None) -> None:
        self.stream = stream  # None: sys.stdout at the time of writing (pytest and shells may replace it)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        stream = self.stream or sys.stdout
        if not trainer.is_global_zero or stream.isatty():
            return
        metrics = trainer.callback_metrics
        figures = " ".join(f"{label} {fmt.format(float(metrics[key]))}" for label, key, fmt in FIGURES
                           if key in metrics)
        print(f"Epoch {trainer.current_epoch}/{trainer.max_epochs - 1}: {figures} "
              f"({time.perf_counter() - self._start:.0f} s)", file=stream, flush=True)
