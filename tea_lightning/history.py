"""Every epoch's losses and validation scores, as a line per epoch in logs that are not a terminal and, when fit
ends, as results.csv and plots/results.png in the run folder (YOLOv5's results.csv and results.png), whatever the
logger: with W&B offline the figures otherwise sit only in its binary run file."""

from __future__ import annotations

import csv
import sys

from pytorch_lightning import Callback
from pytorch_lightning.utilities import rank_zero_info

from tea_lightning.rundir import run_dir

# (label, metric, format) in the order YOLOv5's train.py prints them: losses, then the validation's scores
PRINTED = [("box", "train/box_loss", "{:.4f}"), ("obj", "train/obj_loss", "{:.4f}"),
           ("cls", "train/cls_loss", "{:.4f}"), ("mAP50", "val/mAP50", "{:.4f}"),
           ("mAP50-95", "val/mAP50-95", "{:.4f}"), ("P", "val/precision", "{:.3f}"), ("R", "val/recall", "{:.3f}")]
KEPT = ["train/box_loss", "train/obj_loss", "train/cls_loss", "val/box_loss", "val/obj_loss", "val/cls_loss",
        "val/precision", "val/recall", "val/f1", "val/mAP50", "val/mAP50-95"]


class EpochHistory(Callback):
    """Keeps each training epoch's losses and its validation's scores (in checkpoints too, so a resumed fit's files
    cover every epoch), prints them as a line per epoch when standard output is not a terminal (Lightning's progress
    bar writes nothing to a file until training ends, so a SLURM or nohup log would show no progress for hours; in a
    terminal the bar shows the same figures), and writes results.csv and plots/results.png when fit ends."""

    def __init__(self, stream=None) -> None:
        self.stream = stream  # None: sys.stdout at the time of writing (pytest and shells may replace it)
        self.history: list[dict] = []

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = list(state_dict["history"])

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # Lightning has validated this epoch by now: callback_metrics hold its validation's figures
        metrics = trainer.callback_metrics
        row = {"epoch": trainer.current_epoch, **{key: float(metrics[key]) for key in KEPT if key in metrics}}
        self.history = [r for r in self.history if r["epoch"] != row["epoch"]] + [row]  # a resumed epoch, anew
        stream = self.stream or sys.stdout
        if trainer.is_global_zero and not stream.isatty():
            figures = " ".join(f"{label} {fmt.format(row[key])}" for label, key, fmt in PRINTED if key in row)
            # the epoch's time as TrainingSpeed (called before this callback) measured it, validation included
            seconds = sum(float(metrics[key]) for key in ("train/seconds", "val/seconds") if key in metrics)
            print(f"Epoch {row['epoch']}/{trainer.max_epochs - 1}: {figures} ({seconds:.0f} s)", file=stream,
                  flush=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or not self.history:
            return
        from tea_lightning.study.figures import results_figure

        folder = run_dir(trainer)
        with open(folder / "results.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, ["epoch", *KEPT])
            writer.writeheader()
            writer.writerows(self.history)
        (folder / "plots").mkdir(exist_ok=True)
        figure = results_figure(self.history, folder / "plots" / "results.png")
        rank_zero_info(f"Losses and scores per epoch: {folder / 'results.csv'} and {figure}")
