"""TrainingSpeed's arithmetic on a simulated clock: images per second, and the share spent waiting for data."""

from types import SimpleNamespace

import pytest
import torch

from tea_lightning.model import speed


class LoggedValues:
    """Stands in for the LightningModule: keeps what the callback logs."""

    def __init__(self):
        self.values = {}

    def log(self, name, value, **_):
        self.values[name] = value


def run_epoch(monkeypatch, timeline: list[tuple[str, float, float]]) -> dict:
    """Replay one training epoch on a simulated clock, started at 0 s: ("batch" | "validation", start, end) events
    in order; return what the callback logged."""
    now = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])
    callback, module = speed.TrainingSpeed(), LoggedValues()
    trainer = SimpleNamespace(world_size=2, sanity_checking=False)
    batch = {"images": torch.zeros(4, 3, 8, 8)}
    callback.on_train_epoch_start(trainer, module)
    for index, (kind, start, end) in enumerate(timeline):
        now[0] = start
        if kind == "batch":
            callback.on_train_batch_start(trainer, module, batch, index)
        else:
            callback.on_validation_epoch_start(trainer, module)
        now[0] = end
        if kind == "batch":
            callback.on_train_batch_end(trainer, module, None, batch, index)
        else:
            callback.on_validation_epoch_end(trainer, module)
    callback.on_train_epoch_end(trainer, module)
    return module.values


def test_images_per_second_and_data_wait_share_follow_the_clock(monkeypatch):
    # 2 s of worker start-up before the first batch, then 0.5 s and 1.5 s waits
    logged = run_epoch(monkeypatch, [("batch", 2.0, 3.0), ("batch", 3.5, 4.5), ("batch", 6.0, 7.0)])
    assert logged["train/seconds"] == pytest.approx(7.0)
    assert logged["train/images_per_s"] == pytest.approx(3 * 4 * 2 / 7.0)  # both processes' images
    assert logged["train/data_wait_share"] == pytest.approx(2.0 / 7.0)  # start-up is not counted


def test_validation_inside_the_epoch_is_neither_training_nor_waiting(monkeypatch):
    # the same epoch with a 10 s validation mid-epoch (val_check_interval < 1) and a 20 s one at its end
    logged = run_epoch(monkeypatch, [("batch", 2.0, 3.0), ("batch", 3.5, 4.5), ("validation", 4.5, 14.5),
                                     ("batch", 16.0, 17.0), ("validation", 17.0, 37.0)])
    assert logged["val/seconds"] == pytest.approx(20.0)
    assert logged["train/seconds"] == pytest.approx(7.0)
    assert logged["train/data_wait_share"] == pytest.approx(2.0 / 7.0)
