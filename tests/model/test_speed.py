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


def test_images_per_second_and_data_wait_share_follow_the_clock(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(speed.time, "perf_counter", lambda: now[0])
    callback, module = speed.TrainingSpeed(), LoggedValues()
    trainer = SimpleNamespace(world_size=2, sanity_checking=False)
    batch = {"images": torch.zeros(4, 3, 8, 8)}
    callback.on_train_epoch_start(trainer, module)
    # (batch start, batch end): 2 s of worker start-up before the first batch, then 0.5 s and 1.5 s waits
    for index, (start, end) in enumerate([(2.0, 3.0), (3.5, 4.5), (6.0, 7.0)]):
        now[0] = start
        callback.on_train_batch_start(trainer, module, batch, index)
        now[0] = end
        callback.on_train_batch_end(trainer, module, None, batch, index)
    callback.on_train_epoch_end(trainer, module)
    assert module.values["train/seconds"] == pytest.approx(7.0)
    assert module.values["train/images_per_s"] == pytest.approx(3 * 4 * 2 / 7.0)  # both processes' images
    assert module.values["train/data_wait_share"] == pytest.approx(2.0 / 7.0)  # start-up is not counted
