"""Distillation from a teacher: the loss is zero for the teacher itself and teaches a pruned student, a teacher
with another head is a clear error, and a fit with a teacher checkpoints only the student."""

import copy
import csv
import shutil

import pytest
import torch

from tea_lightning.cli import cli_main, main
from tea_lightning.errors import ConfigError
from tea_lightning.model.detector import Detector
from tea_lightning.model.distillation import OutputDistillation
from tea_lightning.model.weights import read_model
from tea_lightning.pruning.pruner import prune
from tests.conftest import FAST, YOLOV5N, need

HYP = {"box": 0.05, "obj": 1.0, "cls": 0.5}
BALANCE = [4.0, 1.0, 0.4]


@pytest.fixture(scope="module")
def teacher_checkpoint(trained):
    _, run = trained
    return run / "checkpoints" / "best.ckpt"


def test_loss_is_zero_for_the_teacher_itself_and_teaches_a_pruned_student(teacher_checkpoint):
    torch.manual_seed(0)
    images = torch.rand(4, 3, 128, 128)
    distillation = OutputDistillation(read_model(teacher_checkpoint, "--model.teacher"), weight=1.0)
    itself = copy.deepcopy(distillation.teacher)(images)[1]
    assert distillation.loss(images, itself, HYP, BALANCE).item() == pytest.approx(0, abs=1e-5)

    student = copy.deepcopy(distillation.teacher).requires_grad_(True)
    prune(student, images[:1], 0.3)
    student.train()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(20):
        loss = distillation.loss(images, student(images), HYP, BALANCE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.01
    assert losses[-1] < 0.5 * losses[0]


def test_teacher_with_another_head_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"--model.teacher .*yolov5n.pt has a head for 80 classes.*2 classes"):
        Detector(nc=2, teacher=str(need(YOLOV5N)))


def test_teacher_whose_model_yaml_is_gone_names_the_teacher(teacher_checkpoint, tmp_path):
    checkpoint = torch.load(teacher_checkpoint, map_location="cpu", weights_only=False)
    checkpoint["hyper_parameters"]["model_cfg"] = "/nowhere/custom_yolov5n.yaml"
    torch.save(checkpoint, tmp_path / "moved.ckpt")
    with pytest.raises(ValueError, match=f"yaml --model.teacher {tmp_path / 'moved.ckpt'} was trained with, "
                                         "/nowhere/custom_yolov5n.yaml: no such file"):
        read_model(tmp_path / "moved.ckpt", "--model.teacher")


def test_fit_with_a_teacher_logs_its_loss_and_checkpoints_only_the_student(teacher_checkpoint, synthetic_yaml,
                                                                             tmp_path):
    teacher = shutil.copy(teacher_checkpoint, tmp_path / "teacher.ckpt")
    cli = cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights",
                    str(teacher_checkpoint), "--model.teacher", str(teacher), "--trainer.max_epochs", "3",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.callbacks+=tea_lightning.ChannelPruning",
                    "--trainer.callbacks.pruning_ratio", "0.3"])
    run = tmp_path / "version_0"
    with open(run / "metrics.csv") as f:
        distill = [float(r["train/distill_loss"]) for r in csv.DictReader(f) if r.get("train/distill_loss")]
    assert len(distill) == 3 and distill[-1] < distill[0]  # the pruned student comes back towards its teacher
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    assert set(best["state_dict"]) == set(cli.model.state_dict()) == {f"model.{k}" for k in
                                                                    cli.model.model.state_dict()}
    (tmp_path / "teacher.ckpt").unlink()  # evaluation never needs the teacher
    check = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--ckpt_path",
                      str(run / "checkpoints" / "best.ckpt"), "--trainer.default_root_dir", str(tmp_path / "v")])
    assert check.model.distillation is None
    main(["export-pt", str(run / "checkpoints" / "best.ckpt"), str(tmp_path / "best.pt")])
    assert set(torch.load(tmp_path / "best.pt", weights_only=False)["model"].state_dict()) == \
        set(cli.model.model.state_dict())
    # the exported pruned .pt as --model.weights: the pruned model again, not the yaml's with few tensors in it
    exported = Detector(nc=cli.model.hparams.nc, weights=str(tmp_path / "best.pt")).model.state_dict()
    for key, tensor in check.model.model.state_dict().items():  # best.ckpt's
        torch.testing.assert_close(exported[key].float(), tensor.float(), rtol=1e-3, atol=1e-3)  # .pt files hold fp16
    assert check.trainer.callback_metrics["val/fitness"].item() == pytest.approx(
        float(cli.trainer.checkpoint_callback.best_model_score), abs=1e-6)
