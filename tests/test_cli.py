"""End to end through the CLI: a short fit on synthetic data learns, its checkpoint validates to the same numbers,
predict writes images and labels, and bad options fail clearly."""

import csv
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import yaml

from tea_lightning import Detector, YoloDataModule
from tea_lightning.cli import cli_main, main
from tea_lightning.errors import ConfigError
from tests.conftest import FAST, YOLOV5N, need

ROOT = Path(__file__).resolve().parents[1]


def epoch_metrics(run_dir) -> list[dict]:
    """Return the rows of metrics.csv that hold validation results, in epoch order."""
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    train = {int(r["epoch"]): float(r["train/box_loss"]) + float(r["train/obj_loss"]) + float(r["train/cls_loss"])
             for r in rows if r.get("train/box_loss")}
    return [{"epoch": int(r["epoch"]), "train_loss": train.get(int(r["epoch"])), "mAP50": float(r["val/mAP50"]),
             "fitness": float(r["val/fitness"])} for r in rows if r.get("val/mAP50")]


def test_fit_lowers_the_loss_and_raises_map(trained):
    _, run = trained
    history = epoch_metrics(run)
    assert len(history) == 30
    first, last = history[0], history[-1]
    assert last["train_loss"] < 0.8 * first["train_loss"]
    assert last["mAP50"] > first["mAP50"] + 0.1


def test_best_and_last_checkpoints_and_run_files_are_written(trained):
    cli, run = trained
    assert (run / "checkpoints" / "best.ckpt").is_file() and (run / "checkpoints" / "last.ckpt").is_file()
    assert (run / "config.yaml").is_file()
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert "current_model_state" in checkpoint  # the EMA is the state_dict, the raw weights are kept beside it
    assert cli.trainer.checkpoint_callback.best_model_path.endswith("best.ckpt")


def test_fit_ends_naming_the_best_checkpoint_its_epoch_and_scores(trained, capsys):
    cli, run = trained
    cli.after_run()  # what the command printed when the fit ended
    best = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)
    scores = best["validation_summary"]
    assert scores["fitness"] == pytest.approx(float(cli.trainer.checkpoint_callback.best_model_score), abs=1e-6)
    assert (f"Best checkpoint (epoch {best['epoch']}: mAP50 {scores['mAP50']:.4f}, mAP50-95 {scores['mAP50-95']:.4f}, "
            f"precision {scores['precision']:.4f}, recall {scores['recall']:.4f}): {run / 'checkpoints' / 'best.ckpt'}"
            ) in capsys.readouterr().out


def fit_callback_warnings(recorded) -> list[str]:
    """Return Lightning's warnings about restoring the fit's callbacks (checkpoints, EMA) outside fit."""
    signs = ("dirpath has changed", "callbacks used to create the checkpoint", "WeightAveraging")
    return [str(w.message) for w in recorded if any(sign in str(w.message) for sign in signs)]


def test_best_checkpoint_validates_to_the_fitness_it_was_saved_with(trained, synthetic_yaml, tmp_path, recwarn):
    cli, run = trained
    saved = float(cli.trainer.checkpoint_callback.best_model_score)
    validation = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml),
                           "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(run / "checkpoints" /
                                                                                              "best.ckpt")])
    assert validation.trainer.callback_metrics["val/fitness"].item() == pytest.approx(saved, abs=1e-6)
    summary = torch.load(run / "checkpoints" / "best.ckpt", weights_only=False)["validation_summary"]
    for key in ("mAP50", "mAP50-95", "precision", "recall"):  # the scores the checkpoint says it has
        assert validation.trainer.callback_metrics[f"val/{key}"].item() == pytest.approx(summary[key], abs=1e-6)
    assert {"val/mAP50", "val/mAP50-95", "val/precision", "val/recall", "val/f1"} <= set(
        validation.trainer.callback_metrics)
    assert validation.trainer.checkpoint_callbacks == [] and not list(tmp_path.rglob("*.ckpt"))
    assert not fit_callback_warnings(recwarn)


def test_predict_writes_boxes_and_yolo_labels(trained, synthetic_yaml, tmp_path, recwarn):
    _, run = trained
    images = synthetic_yaml.parent / "images" / "val"
    cli_main(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--data.predict_source", str(images),
              "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    (out,) = tmp_path.glob("version_*/predictions")
    assert len(list((out / "images").glob("*.jpg"))) == len(list(images.glob("*.jpg")))
    lines = [line.split() for f in (out / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    assert lines and all(len(v) == 5 and 0 <= float(v[1]) <= 1 for v in lines)
    assert not fit_callback_warnings(recwarn)


def test_predict_runs_the_folded_model_and_finds_what_the_training_graph_finds(trained, synthetic_yaml):
    _, run = trained
    model = Detector.from_checkpoint(run / "checkpoints" / "best.ckpt")
    data = YoloDataModule(str(synthetic_yaml), img_size=128, batch_size=4, workers=0,
                          predict_source=str(synthetic_yaml.parent / "images" / "val"))
    model.hparams.predict_conf_thres = 0.1  # no scores within rounding of the threshold, or of the 300th place
    keys = set(model.state_dict())
    predicted = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).predict(
        model, datamodule=data)
    batch_norms = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert batch_norms and set(model.state_dict()) == keys  # the folded copy never joined the module
    assert model._deployed is None
    model.eval()
    with torch.no_grad():
        expected = [model._detections(model(batch["images"])[0], batch, predicting=True)
                    for batch in data.predict_dataloader()]
    pairs = [(p["detections"], e) for batch, expected_batch in zip(predicted, expected)
             for p, e in zip(batch, expected_batch)]
    assert sum(len(e) for _, e in pairs) > 0
    found = torch.cat([got for got, _ in pairs])
    assert (found[:, 4] >= 0.1).all()
    assert len(found[:, :4].unique(dim=0)) == len(found)  # one class per box, as YOLOv5's detect.py
    for got, want in pairs:  # same boxes, scores and classes to rounding
        torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_predict_confidence_threshold_is_an_option(trained, synthetic_yaml, tmp_path):
    _, run = trained
    images = synthetic_yaml.parent / "images" / "val"
    cli_main(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--data.predict_source", str(images),
              "--model.predict_conf_thres", "1.0", "--trainer.default_root_dir", str(tmp_path),
              "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    labels = list(tmp_path.glob("version_*/predictions/labels/*.txt"))
    assert len(labels) == len(list(images.glob("*.jpg"))) and not any(f.read_text() for f in labels)


def test_evaluation_settings_on_the_command_line_win_over_the_checkpoints(trained, synthetic_yaml, tmp_path):
    _, run = trained  # fitted with the defaults conf_thres 0.001, max_det 300
    cli = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.conf_thres", "0.3",
                    "--model.max_det", "5", "--trainer.default_root_dir", str(tmp_path),
                    "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    assert (cli.model.hparams.conf_thres, cli.model.hparams.max_det) == (0.3, 5)


def test_a_writer_on_the_command_line_writes_confidences_where_told_instead_of_the_default(trained, synthetic_yaml,
                                                                                          tmp_path):
    _, run = trained
    images = synthetic_yaml.parent / "images" / "val"
    cli_main(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--data.predict_source", str(images),
              "--trainer.default_root_dir", str(tmp_path / "runs"),
              "--ckpt_path", str(run / "checkpoints" / "best.ckpt"),
              "--trainer.callbacks+=tea_lightning.DetectionWriter", "--trainer.callbacks.save_conf", "true",
              "--trainer.callbacks.output_dir", str(tmp_path / "out")])
    rows = [line.split() for f in (tmp_path / "out" / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    assert rows and all(len(row) == 6 and 0.25 <= float(row[5]) <= 1 for row in rows)  # YOLOv5's --save-conf rows
    assert len(list((tmp_path / "out" / "images").glob("*.jpg"))) == len(list(images.glob("*.jpg")))
    assert not list((tmp_path / "runs").rglob("predictions"))  # the default writer did not write as well


def test_predict_keeps_subfolders_so_same_named_images_do_not_collide(trained, synthetic_yaml, tmp_path):
    _, run = trained
    source = tmp_path / "field"
    first, second = sorted((synthetic_yaml.parent / "images" / "val").glob("*.jpg"))[:2]
    for camera, image in (("cam1", first), ("cam2", second)):
        (source / camera).mkdir(parents=True)
        (source / camera / "0001.jpg").write_bytes(image.read_bytes())
    cli_main(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--data.predict_source", str(source),
              "--trainer.default_root_dir", str(tmp_path / "out"), "--ckpt_path", str(run / "checkpoints" /
                                                                                   "best.ckpt")])
    (out,) = (tmp_path / "out").glob("version_*/predictions")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == [
        "images/cam1/0001.jpg", "images/cam2/0001.jpg", "labels/cam1/0001.txt", "labels/cam2/0001.txt"]


def test_predict_keeps_apart_images_that_differ_only_in_extension_and_counts_the_boxes(trained, synthetic_yaml,
                                                                                         tmp_path, caplog):
    _, run = trained
    source = tmp_path / "field"
    source.mkdir()
    first, second = sorted((synthetic_yaml.parent / "images" / "val").glob("*.jpg"))[:2]
    (source / "a.jpg").write_bytes(first.read_bytes())
    cv2.imwrite(str(source / "a.png"), cv2.imread(str(second)))
    with pytest.warns(UserWarning, match=r"a\.jpg and .*a\.png share the label name a\.txt: the labels of a\.png are "
                                         r"written to a_png\.txt"):
        cli_main(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--data.predict_source", str(source),
                  "--model.predict_conf_thres", "0.01", "--trainer.default_root_dir", str(tmp_path / "out"),
                  "--ckpt_path", str(run / "checkpoints" / "best.ckpt")])
    (out,) = (tmp_path / "out").glob("version_*/predictions")
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.*")) == [
        "images/a.jpg", "images/a.png", "labels/a.txt", "labels/a_png.txt"]
    boxes = [int(line.split()[0]) for f in (out / "labels").glob("*.txt") for line in f.read_text().splitlines()]
    found = ", ".join(f"{boxes.count(c)} {name}" for c, name in enumerate(["bud", "leaf"]) if c in boxes)
    assert f"Predicted 2 image(s): {len(boxes)} box(es) ({found}) at confidence >= 0.01" in caplog.text


def untrained_warnings(recwarn) -> list[str]:
    return [str(w.message) for w in recwarn if "freshly initialised" in str(w.message)]


def test_validate_with_official_weights_and_no_training(synthetic_yaml, tmp_path, recwarn):
    cli = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights",
                    str(need(YOLOV5N)), "--trainer.default_root_dir", str(tmp_path), "--model.plots", "true"])
    assert 0 <= cli.trainer.callback_metrics["val/mAP50"].item() <= 1
    assert not untrained_warnings(recwarn)
    assert {p.name for p in tmp_path.glob("version_0/plots/val/*.png")} == {
        "PR_curve.png", "P_curve.png", "R_curve.png", "F1_curve.png"}


def test_test_without_weights_warns_that_the_model_is_untrained_and_says_it_tests_on_val(synthetic_yaml, tmp_path,
                                                                                         recwarn, caplog):
    caplog.set_level(logging.INFO)
    cli = cli_main(["test", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
                    str(tmp_path)])
    assert cli.trainer.callback_metrics["test/seconds"] > 0  # as val/seconds in validate
    assert untrained_warnings(recwarn) == [
        "test without --ckpt_path or --model.weights: the model's weights are freshly initialised, so what it finds "
        "means nothing. Give a trained checkpoint (--ckpt_path best.ckpt) or weights (--model.weights yolov5n.pt)."]
    assert f"{synthetic_yaml} has no test split: testing on the val split." in caplog.text


def test_fit_ends_with_the_plots_of_its_best_checkpoint_also_when_stopped_before_max_epochs(synthetic_yaml, tmp_path,
                                                                                            caplog):
    caplog.set_level(logging.INFO)
    fit = cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
                    str(tmp_path / "fit"), "--model.plots", "true", "--trainer.max_epochs", "50",
                    "--trainer.max_steps", "12"])  # 4 steps an epoch: stops after epoch 2 of 50
    best = fit.trainer.checkpoint_callback.best_model_path
    epoch = torch.load(best, map_location="cpu", weights_only=False)["epoch"]
    plots = tmp_path / "fit" / "version_0" / "plots" / "val"
    assert f"Plots (the best checkpoint's validation, epoch {epoch}) written to {plots}" in caplog.text
    assert {p.name for p in plots.glob("*.png")} == {"PR_curve.png", "P_curve.png", "R_curve.png", "F1_curve.png"}
    cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
              str(tmp_path / "check"), "--model.plots", "true", "--ckpt_path", best])
    with np.load(plots / "curves.npz") as fitted, \
            np.load(tmp_path / "check" / "version_0" / "plots" / "val" / "curves.npz") as checked:
        for name in checked.files:  # the very curves of best.ckpt, not of the last epoch
            np.testing.assert_allclose(fitted[name], checked[name], atol=1e-6)


def test_csv_hparams_of_a_run_with_config_files_read_back_as_plain_yaml(synthetic_yaml, tmp_path):
    from pytorch_lightning.core.saving import load_hparams_from_yaml

    demo = ROOT / "configs" / "demo.yaml"
    cli_main(["validate", "--config", str(demo), *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights",
              str(need(YOLOV5N)), "--trainer.default_root_dir", str(tmp_path)])
    saved = tmp_path / "version_0" / "hparams.yaml"
    assert yaml.safe_load(saved.read_text()) == load_hparams_from_yaml(saved)
    config = load_hparams_from_yaml(saved)["config"]
    assert config["data"]["data_yaml"] == str(synthetic_yaml) and config["model"]["recipe"]["lr0"] == 0.02  # FAST's


def test_seed_everything_true_draws_a_random_seed_and_saves_it(synthetic_yaml, tmp_path, monkeypatch):
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    seeds = []
    for run in ("a", "b"):
        cli = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml),
                        "--model.weights", str(need(YOLOV5N)),
                        "--trainer.default_root_dir", str(tmp_path / run), "--seed_everything", "true"])
        seeds.append(cli.config["validate"]["seed_everything"])
        assert f"seed_everything: {seeds[-1]}" in (tmp_path / run / "version_0" / "config.yaml").read_text()
    assert all(isinstance(seed, int) for seed in seeds) and seeds[0] != seeds[1]  # Lightning 2.6 gave 0 twice


@pytest.mark.parametrize("launcher", [
    {"TORCHELASTIC_RUN_ID": "r1", "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"},  # torchrun
    {"SLURM_NTASKS": "2", "SLURM_JOB_NAME": "tea", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"},  # srun
])
def test_seed_everything_true_is_refused_when_a_launcher_started_the_processes(synthetic_yaml, tmp_path,
                                                                                monkeypatch, launcher):
    # each process reads the command line on its own: drawn there, the seeds would differ between processes
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)
    for name, value in launcher.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=r"--seed_everything true: the 2 processes .* --seed_everything \$RANDOM"):
        cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
                  str(tmp_path), "--seed_everything", "true"])
    assert not (tmp_path / "version_0").exists()


@pytest.mark.parametrize("command", ["fit", "validate"])
def test_true_half_precision_is_refused_with_the_alternatives(synthetic_yaml, tmp_path, command):
    with pytest.raises(ValueError, match="--trainer.precision bf16-true is not supported.*use 16-mixed or bf16-mixed"):
        cli_main([command, *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.precision", "bf16-true",
                  "--trainer.max_epochs", "1", "--trainer.default_root_dir", str(tmp_path)])


def test_fit_bounded_only_by_steps_asks_for_epochs(synthetic_yaml, tmp_path):
    with pytest.raises(ValueError, match="--trainer.max_epochs must be set for fit"):
        cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_steps", "4",
                  "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("option, value, message", [
    ("--model.predict_conf_thres", "1.5", "--model.predict_conf_thres must lie between 0 and 1"),
    ("--model.conf_thres", "-0.1", "--model.conf_thres must lie between 0 and 1"),
    ("--model.iou_thres", "60", "--model.iou_thres must lie between 0 and 1"),
    ("--model.max_det", "0", "--model.max_det must be at least 1"),
])
def test_nms_settings_out_of_range_are_named(synthetic_yaml, tmp_path, option, value, message):
    with pytest.raises(ValueError, match=message):
        cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), option, value,
                  "--trainer.default_root_dir", str(tmp_path)])


def test_unknown_model_yaml_names_the_option(synthetic_yaml, tmp_path):
    with pytest.raises(ValueError, match="--model.model_cfg yolov5q.yaml.*yolov5n.yaml"):
        cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.model_cfg", "yolov5q.yaml",
                  "--trainer.default_root_dir", str(tmp_path)])


@pytest.mark.parametrize("kind, expected", [
    ("missing", "does not exist: give the path of a tea-lightning .ckpt \\(fit writes best.ckpt and last.ckpt"),
    ("yolov5", "is not a checkpoint written by tea-lightning fit"),
    ("folder", "is a folder: give the path of a tea-lightning .ckpt .* \\(best.ckpt there\\)"),
    ("onnx", "could not be read as a checkpoint \\(a .onnx file is not a PyTorch checkpoint: give a tea-lightning")])
def test_export_of_what_is_not_our_checkpoint_is_a_clear_error(tmp_path, kind, expected):
    checkpoint = {"yolov5": need(YOLOV5N), "missing": tmp_path / "nope.ckpt", "folder": tmp_path / "checkpoints",
                  "onnx": tmp_path / "model.onnx"}[kind]
    if kind == "folder":
        checkpoint.mkdir()
        (checkpoint / "best.ckpt").write_bytes(b"")
    if kind == "onnx":
        checkpoint.write_bytes(b"\x08\x07onnx")
    with pytest.raises(SystemExit, match=f"error: checkpoint {checkpoint} {expected}"):
        main(["export-pt", str(checkpoint), str(tmp_path / "out.pt")])
    assert not (tmp_path / "out.pt").exists()


def test_export_pt_never_writes_over_a_checkpoint(trained, tmp_path):
    _, run = trained
    copy = tmp_path / "best.ckpt"
    copy.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes())
    before = copy.read_bytes()
    for output in (copy, tmp_path / "other.ckpt"):
        with pytest.raises(SystemExit, match=f"error: {output}: export-pt writes a YOLOv5 .pt .* name the output .pt, "
                                             f"e.g. {output.with_suffix('.pt')}"):
            main(["export-pt", str(copy), str(output)])
    assert copy.read_bytes() == before and not (tmp_path / "other.ckpt").exists()


def test_demo_data_command_writes_a_data_set(tmp_path, capsys):
    main(["demo-data", str(tmp_path / "d"), "--n-train", "4", "--n-val", "2"])
    assert (tmp_path / "d" / "data.yaml").is_file()
    assert "data.yaml" in capsys.readouterr().out


def test_wandb_offline_run_holds_the_config_params_and_gflops(synthetic_yaml, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder
    args = [a for a in FAST if a not in ("--trainer.logger", "CSVLogger")]
    cli = cli_main(["fit", *args, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path / "out")])
    experiment = cli.trainer.logger.experiment
    config = dict(experiment.config)
    experiment.finish()
    assert config["model/params"] > 1e6 and config["model/GFLOPs"] > 0
    assert config["config"]["model"]["model_cfg"] == "yolov5n.yaml" and config["data"]["nc"] == 2
    (run,) = (tmp_path / "out" / "wandb").glob("offline-run-*")
    record_file = run / f"run-{run.name.split('-')[-1]}.wandb"  # what `wandb sync` uploads
    # W&B's service process may still be writing it when finish() returns (seen on a busy machine)
    deadline = time.monotonic() + 120
    keys = (b"model/GFLOPs", b"val/mAP50")
    while not (record_file.exists() and all(key in record_file.read_bytes() for key in keys)):
        assert time.monotonic() < deadline, f"{record_file} holds no model/GFLOPs and val/mAP50 after 120 s"
        time.sleep(0.5)
    assert not (tmp_path / "wandb").exists()


@pytest.mark.parametrize("args", [["check-data", "DATA"], ["--help"]])
def test_output_piped_to_a_reader_that_has_gone_ends_quietly(synthetic_yaml, args):
    # as `tea-lightning check-data DATA | head -1` once the reader has exited
    command = subprocess.Popen([sys.executable, "-m", "tea_lightning.cli",
                                *[str(synthetic_yaml) if a == "DATA" else a for a in args]],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command.stdout.close()
    errors = command.stderr.read()
    assert command.wait() == 128 + signal.SIGPIPE and "Traceback" not in errors and "Exception ignored" not in errors


def test_check_data_prints_the_summary_and_problems(synthetic_yaml, tmp_path, capsys):
    main(["check-data", str(synthetic_yaml)])
    out = capsys.readouterr().out
    assert "2 classes (bud, leaf)" in out and "train: 16 images" in out and "val: 8 images" in out
    broken = tmp_path / "d"
    main(["demo-data", str(broken), "--n-train", "4", "--n-val", "2"])
    label = next((broken / "labels" / "train").glob("*.txt"))
    label.write_text(label.read_text() + "7 0.5 0.5 0.1 0.1\n")
    main(["check-data", str(broken / "data.yaml")])
    out = capsys.readouterr().out
    assert f"{label}:" in out and "class id 7" in out and "2 problem(s)" in out  # the row, and its image skipped
    main(["check-data", str(synthetic_yaml), "--strict"])  # no problem: no error
    with pytest.raises(SystemExit, match=r"error: .*d/data.yaml: 2 problem\(s\), listed above \(--strict\)"):
        main(["check-data", str(broken / "data.yaml"), "--strict"])
    with pytest.raises(SystemExit, match="does not exist"):
        main(["check-data", str(tmp_path / "missing.yaml")])


def test_16_mixed_on_a_cpu_runs_bf16_mixed_and_config_yaml_says_so(synthetic_yaml, tmp_path):
    # Lightning switches to bf16-mixed on a CPU with a warning; config.yaml recorded the 16-mixed that did not run
    cli = cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "1",
                    "--trainer.limit_train_batches", "1", "--trainer.limit_val_batches", "1",
                    "--trainer.accelerator", "cpu", "--trainer.precision", "16-mixed",
                    "--trainer.default_root_dir", str(tmp_path)])
    assert cli.trainer.precision == "bf16-mixed"
    saved = yaml.safe_load((tmp_path / "version_0" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == "bf16-mixed"
