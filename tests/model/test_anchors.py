"""YOLOv5's AutoAnchor: the anchors are checked against the training boxes at the start of a fit and evolved for the
data set when they fit poorly."""

import logging
import random
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch

from tea_lightning import Detector, YoloDataModule
from tea_lightning.data.labels import ImageRecord
from tea_lightning.errors import ConfigError
from tea_lightning.model import anchors as anchors_module
from tea_lightning.model.anchors import check_anchors_fit, fit_anchors
from tea_lightning.model.recipe import ExponentialMovingAverage
from tea_lightning.model.weights import build_model


def records(box_sizes: list[tuple[float, float]], images: int = 30, seed: int = 0) -> list[ImageRecord]:
    """Square 416 px images, each with one box of every (width, height) in `box_sizes` (normalised), jittered."""
    rng = np.random.default_rng(seed)
    return [ImageRecord(Path(f"{i}.jpg"), 416, 416,
                        np.array([[0, 0.5, 0.5, w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
                                  for w, h in box_sizes], np.float32), "box")
            for i in range(images)]


def best_possible_recall(model, recs: list[ImageRecord], img_size: int = 416, anchor_t: float = 4.0) -> float:
    """The share of boxes for which some anchor is within a factor `anchor_t` of both their width and height."""
    head = model.model[-1]
    wh = torch.tensor(np.concatenate([r.boxes[:, 3:5] * img_size for r in recs]))  # square images
    anchors = (head.anchors * head.stride.view(-1, 1, 1)).view(-1, 2)
    ratio = wh[:, None] / anchors[None]
    worst_side = torch.min(ratio, 1 / ratio).min(2).values
    return float((worst_side.max(1).values > 1 / anchor_t).float().mean())


THIN_BOXES = [(0.9, 0.02), (0.02, 0.9), (0.6, 0.015)]  # rows and stems: no COCO anchor is that elongated


def test_anchors_that_fit_poorly_are_evolved_for_the_boxes():
    model = build_model("yolov5n.yaml", nc=1)
    recs = records(THIN_BOXES)
    x = torch.rand(1, 3, 128, 128)
    model.eval()(x)  # the head caches grids built from the anchors
    before = best_possible_recall(model, recs)
    assert check_anchors_fit(model, recs, 416, 4.0)
    assert before < 0.5 and best_possible_recall(model, recs) > 0.98
    fresh = build_model("yolov5n.yaml", nc=1)
    fresh.load_state_dict(model.state_dict())  # the anchors are a buffer: checkpoints keep the evolved ones
    torch.testing.assert_close(model(x)[0], fresh.eval()(x)[0])  # predictions use the new anchors, not cached ones


def test_anchors_that_fit_are_kept(caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("yolov5"), "handlers", [caplog.handler])  # it does not propagate to root
    model = build_model("yolov5n.yaml", nc=1)
    anchors = model.model[-1].anchors.clone()
    recs = records([(0.05, 0.08), (0.1, 0.1), (0.3, 0.2)])  # shoot-sized boxes
    assert best_possible_recall(model, recs) > 0.98
    assert not check_anchors_fit(model, recs, 416, 4.0)
    assert torch.equal(model.model[-1].anchors, anchors)
    # the messages as written to log files (caplog.text has colour codes removed)
    printed = "".join(record.getMessage() for record in caplog.records)
    assert "AutoAnchor: " in printed and "Best Possible Recall" in printed
    assert "\x1b[" not in printed  # no colour codes to litter log files


def test_the_check_leaves_the_global_random_streams_where_they_were():
    # YOLOv5's search draws from numpy's and Python's global generators; a seeded fit's other draws must not move
    np.random.seed(0), random.seed(0)
    expected = np.random.random(), random.random()
    np.random.seed(0), random.seed(0)
    assert check_anchors_fit(build_model("yolov5n.yaml", nc=1), records(THIN_BOXES), 416, 4.0)
    assert (np.random.random(), random.random()) == expected


def test_a_failed_search_keeps_the_anchors_and_a_ctrl_c_still_stops(monkeypatch):
    # yolov5's check_anchors is wrapped in a decorator that swallows every exception, KeyboardInterrupt included
    from yolov5.utils import autoanchor

    model = build_model("yolov5n.yaml", nc=1)
    anchors = model.model[-1].anchors.clone()

    def failing(error):
        def search(dataset, model, thr, imgsz):
            model.model[-1].anchors.mul_(2)  # half done
            raise error
        return autoanchor.TryExcept("AutoAnchor: ERROR")(search)

    monkeypatch.setattr(autoanchor, "check_anchors", failing(ValueError("no kmeans")))
    with pytest.warns(UserWarning, match=r"AutoAnchor failed \(ValueError\('no kmeans'\)\); the fit goes on"):
        assert not check_anchors_fit(model, records(THIN_BOXES), 416, 4.0)
    assert torch.equal(model.model[-1].anchors, anchors)
    monkeypatch.setattr(autoanchor, "check_anchors", failing(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        check_anchors_fit(model, records(THIN_BOXES), 416, 4.0)


def test_evolved_anchors_are_rounded_to_the_half_precision_they_are_exported_in():
    model = build_model("yolov5n.yaml", nc=1)
    assert check_anchors_fit(model, records(THIN_BOXES), 416, 4.0)
    anchors = model.model[-1].anchors
    assert torch.equal(anchors, anchors.half().float())


def test_the_other_processes_take_the_first_ones_anchors():
    # under DDP only rank 0 searches; what it sends goes through the CPU (a pickled CUDA tensor lands on rank 0's GPU)
    sent = []
    evolved = torch.rand(3, 3, 2) + 1

    def broadcast(obj, src):
        sent.append(obj)
        return evolved, True

    model = build_model("yolov5n.yaml", nc=1)
    x = torch.rand(1, 3, 64, 64)
    model.eval()(x)  # cached grids
    rank1 = SimpleNamespace(is_global_zero=False, strategy=SimpleNamespace(broadcast=broadcast))
    assert fit_anchors(rank1, model, records(THIN_BOXES), 416, 4.0)
    assert sent[0][0].device.type == "cpu" and sent[0][1] is False  # rank 1 searched nothing
    assert torch.equal(model.model[-1].anchors, evolved)
    fresh = build_model("yolov5n.yaml", nc=1)
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(model(x)[0], fresh.eval()(x)[0])


def small_fit(root, dm, model, epochs=1, ckpt_path=None, callbacks=()) -> pl.Trainer:
    trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, logger=False,
                         default_root_dir=root, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[pl.callbacks.ModelCheckpoint(root, save_last=True), *callbacks])
    trainer.fit(model, datamodule=dm, ckpt_path=ckpt_path)
    return trainer


def test_a_fit_checks_the_anchors_once_and_a_resume_keeps_them(synthetic_yaml, tmp_path, monkeypatch):
    # at 64 px the synthetic shapes are a few pixels across, smaller than YOLOv5's smallest anchor (BPR 0.92)
    calls = []
    monkeypatch.setattr(anchors_module, "check_anchors_fit",
                        lambda *args: calls.append(args) or check_anchors_fit(*args))
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    yaml_anchors = build_model("yolov5n.yaml", dm.nc).model[-1].anchors
    model = Detector(nc=dm.nc, img_size=64, batch_size=4)
    ema_anchors_at_start = []
    small_fit(tmp_path, dm, model, callbacks=[pl.callbacks.LambdaCallback(on_train_start=lambda trainer, _: [
        ema_anchors_at_start.append(c._average_model.module.model.model[-1].anchors.clone())
        for c in trainer.callbacks if isinstance(c, ExponentialMovingAverage)])])
    evolved = model.model.model[-1].anchors.clone()
    assert len(calls) == 1 and not torch.equal(evolved, yaml_anchors)
    # the EMA copy, made before the fit started, validates and is saved with them from the first validation on
    assert torch.equal(ema_anchors_at_start[0], evolved)
    resumed = Detector(nc=dm.nc, img_size=64, batch_size=4)
    small_fit(tmp_path, dm, resumed, epochs=2, ckpt_path=tmp_path / "last.ckpt")
    assert len(calls) == 1 and torch.equal(resumed.model.model[-1].anchors, evolved)
    kept = Detector(nc=dm.nc, img_size=64, batch_size=4, autoanchor=False)
    small_fit(tmp_path / "kept", dm, kept)
    assert len(calls) == 1 and torch.equal(kept.model.model[-1].anchors, yaml_anchors)


def test_a_student_keeps_its_teachers_anchors(synthetic_yaml, tmp_path):
    # distillation compares the outputs anchor by anchor: new anchors for the student would no longer match them
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    small_fit(tmp_path, dm, Detector(nc=dm.nc, img_size=64, batch_size=4, autoanchor=False))  # anchors fit poorly
    teacher = str(tmp_path / "last.ckpt")
    student = Detector(nc=dm.nc, img_size=64, batch_size=4, weights=teacher, teacher=teacher)
    small_fit(tmp_path / "student", dm, student)
    assert torch.equal(student.model.model[-1].anchors, student.distillation.teacher.model[-1].anchors)


@pytest.mark.parametrize("load", [
    lambda ckpt, nc: Detector(nc=nc, img_size=64, batch_size=4, weights=ckpt),  # --model.weights
    # from Python; AutoAnchor on again (the run that saved it had it off), or the fit would not even try it
    lambda ckpt, nc: Detector.load_from_checkpoint(ckpt, autoanchor=True),
], ids=["weights", "load_from_checkpoint"])
def test_a_fit_from_weights_trained_here_keeps_their_anchors(synthetic_yaml, tmp_path, load):
    # a new search would replace, by chance, anchors the head was trained with (here: poor ones, kept on purpose)
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    trained = Detector(nc=dm.nc, img_size=64, batch_size=4, autoanchor=False)
    small_fit(tmp_path, dm, trained)
    finetuned = load(str(tmp_path / "last.ckpt"), dm.nc)
    small_fit(tmp_path / "finetuned", dm, finetuned)
    assert torch.equal(finetuned.model.model[-1].anchors, trained.model.model[-1].anchors)


def test_a_model_without_trained_weights_takes_its_teachers_anchors(synthetic_yaml, tmp_path):
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    teacher = Detector(nc=dm.nc, img_size=64, batch_size=4)
    small_fit(tmp_path, dm, teacher)  # AutoAnchor evolved its anchors
    student = Detector(nc=dm.nc, img_size=64, batch_size=4, teacher=str(tmp_path / "last.ckpt"))
    assert torch.equal(student.model.model[-1].anchors, teacher.model.model[-1].anchors)


def test_a_teacher_with_other_anchors_than_the_trained_weights_is_refused(synthetic_yaml, tmp_path):
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    small_fit(tmp_path / "evolved", dm, Detector(nc=dm.nc, img_size=64, batch_size=4))
    small_fit(tmp_path / "kept", dm, Detector(nc=dm.nc, img_size=64, batch_size=4, autoanchor=False))
    with pytest.raises(ConfigError, match="--model.teacher .*evolved/last.ckpt predicts with other anchors than those "
                                          "the head of --model.weights .*kept/last.ckpt was trained with"):
        Detector(nc=dm.nc, img_size=64, batch_size=4, weights=str(tmp_path / "kept" / "last.ckpt"),
                 teacher=str(tmp_path / "evolved" / "last.ckpt"))


def test_a_loaded_checkpoint_takes_only_a_teacher_with_its_anchors(synthetic_yaml, tmp_path):
    # the teacher is checked against the loaded head, not against the fresh one Lightning builds before loading
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)
    small_fit(tmp_path / "evolved", dm, Detector(nc=dm.nc, img_size=64, batch_size=4))
    small_fit(tmp_path / "kept", dm, Detector(nc=dm.nc, img_size=64, batch_size=4, autoanchor=False))
    kept, evolved = str(tmp_path / "kept" / "last.ckpt"), str(tmp_path / "evolved" / "last.ckpt")
    with pytest.raises(ConfigError, match="--model.teacher .*evolved/last.ckpt predicts with other anchors than those "
                                          "the head of the checkpoint .*kept/last.ckpt was trained with"):
        Detector.load_from_checkpoint(kept, teacher=evolved)
    student = Detector.load_from_checkpoint(evolved, teacher=evolved)
    assert student.hparams.teacher == evolved and student.distillation is not None
