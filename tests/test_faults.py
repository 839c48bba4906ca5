"""Fault injection through the `tea-lightning` command: each bad input or failure ends in a clear message that names
the file, line or option (status 1 where the run cannot go on) and loses no finished epoch. docs/reliability.md
lists every case with the test that tries it."""

import errno
import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tea_lightning.cli import cli_main, main
from tea_lightning.data.dataset import EvalDataset
from tea_lightning.data.labels import load_split, read_data_yaml
from tea_lightning.data.synthetic import make_synthetic_dataset
from tests.conftest import FAST, YOLOV5N, need

ROOT = Path(__file__).resolve().parents[1]


def fails(args: list[str], *expected: str) -> str:
    """Run the command, check that it exits with status 1 and an `error:` message holding `expected`."""
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)  # sys.exit(message) prints it and ends with status 1
    assert message.startswith("error: "), message
    for text in expected:
        assert text in message, message
    return message


@pytest.fixture
def data(tmp_path) -> Path:
    """A small writable data set each test may break (4 training, 2 validation images)."""
    return make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=2, image_size=128, seed=3)


def fit_args(data_yaml: Path, root: Path, epochs: int = 1) -> list[str]:
    return ["fit", *FAST, "--data.data_yaml", str(data_yaml), "--trainer.max_epochs", str(epochs),
            "--trainer.default_root_dir", str(root)]


def check_data(data_yaml: Path, capsys) -> str:
    main(["check-data", str(data_yaml)])
    return capsys.readouterr().out


# ---- data ---------------------------------------------------------------------------------------------------------
def test_missing_data_yaml(tmp_path):
    fails(fit_args(tmp_path / "nope.yaml", tmp_path), f"{tmp_path / 'nope.yaml'} does not exist", "--data.data_yaml")


def test_data_yaml_that_is_a_folder(data, tmp_path, capsys):
    fails(fit_args(data.parent, tmp_path), f"data yaml {data.parent} is a folder", "(data.yaml there)")
    fails(["check-data", str(data.parent)], f"data yaml {data.parent} is a folder")


def test_yaml_without_train_val_names(data, tmp_path):
    data.write_text("nc: 2\n")
    fails(fit_args(data, tmp_path), str(data), "lacks train, val, names")


def test_split_path_that_does_not_exist(data, tmp_path):
    content = yaml.safe_load(data.read_text())
    data.write_text(yaml.safe_dump({**content, "train": "images/elsewhere"}))
    fails(fit_args(data, tmp_path), "images/elsewhere", "does not exist", "fix the path in the yaml")


def test_empty_image_folder(data, tmp_path):
    for image in (data.parent / "images" / "train").iterdir():
        image.unlink()
    fails(fit_args(data, tmp_path), "no images found for 'train'", str(data.parent / "images" / "train"))


def test_broken_tiny_and_orphan_files_are_named_and_skipped(data, tmp_path, capsys):
    import yolov5.models.yolo  # noqa: F401  imports ultralytics, which replaces PIL's Image.open (see labels.py)

    train = data.parent / "images" / "train"
    good = sorted(train.glob("*.jpg"))
    truncated = good[0].read_bytes()
    (train / "truncated.jpg").write_bytes(truncated[: len(truncated) // 3])
    (train / "not_an_image.jpg").write_text("this is text")
    Image.new("RGB", (1, 1)).save(train / "one_pixel.png")
    orphan = data.parent / "labels" / "train" / "renamed_image.txt"
    orphan.write_text("0 0.5 0.5 0.2 0.2\n")
    out = check_data(data, capsys)
    assert f"{train / 'truncated.jpg'}: unreadable image, skipped" in out
    assert f"{train / 'not_an_image.jpg'}: unreadable image, skipped (UnidentifiedImageError: cannot identify" in out
    assert "pi_heif" not in out  # ultralytics' Image.open would try to pip-install pi-heif for it
    assert f"{train / 'one_pixel.png'}: image is 1x1 pixels, under 10 a side: skipped" in out
    assert f"{orphan}: label file without an image, ignored" in out
    assert "4 problem(s)" in out
    main(fit_args(data, tmp_path))  # training goes on with the good images
    assert (tmp_path / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_splits_listed_in_txt_files_sharing_one_folder_have_no_false_orphan_labels(data, capsys):
    root = data.parent
    for image in sorted((root / "images" / "val").glob("*.jpg")):  # one images/ and one labels/ folder for both
        image.rename(root / "images" / "train" / image.name)
        label = root / "labels" / "val" / f"{image.stem}.txt"
        label.rename(root / "labels" / "train" / label.name)
    images = sorted((root / "images" / "train").glob("*.jpg"))
    (root / "train.txt").write_text("".join(f"images/train/{p.name}\n" for p in images if p.stem.startswith("train")))
    (root / "val.txt").write_text("".join(f"images/train/{p.name}\n" for p in images if p.stem.startswith("val")))
    data.write_text(yaml.safe_dump({**yaml.safe_load(data.read_text()), "train": "train.txt", "val": "val.txt"}))
    orphan = root / "labels" / "train" / "renamed_image.txt"
    orphan.write_text("0 0.5 0.5 0.2 0.2\n")
    out = check_data(data, capsys)
    flagged = [line for line in out.splitlines() if "label file without an image" in line]
    assert flagged and all(str(orphan) in line for line in flagged), out  # each split names the real orphan only


def test_bad_label_rows_are_named_with_file_and_line(data, capsys):
    label = sorted((data.parent / "labels" / "train").glob("*.txt"))[0]
    good_rows = label.read_text().splitlines()
    bad = ["0 0.5 0.5 0.1", "0 0.5 0.5 0.1 0.1 0.2", "0 0.1 0.1 0.2 0.1 0.2 0.2 0.3", "0 0.5 0.5 1.4 0.1",
           "0 -0.5 0.5 0.1 0.1", "0 0.5 x 0.1 0.1", "5 0.5 0.5 0.1 0.1", good_rows[0]]
    label.write_text("\n".join(good_rows + bad) + "\n")
    out = check_data(data, capsys)
    first_bad = len(good_rows) + 1
    for line in range(first_bad, first_bad + len(bad) - 1):
        assert f"{label}:{line}:" in out, line
    assert f"{label}:{first_bad + len(bad) - 1}: duplicate row, dropped" in out
    image = data.parent / "images" / "train" / f"{label.stem}.jpg"  # its objects would be learnt as background
    assert f"{image}: skipped: {len(bad) - 1} bad row(s) in {label.name} (above)" in out


def test_empty_label_file_is_a_background_image(data):
    label = sorted((data.parent / "labels" / "train").glob("*.txt"))[0]
    label.write_text("")
    index = load_split(read_data_yaml(data), "train")
    record = next(r for r in index.records if r.image.stem == label.stem)
    assert len(record.boxes) == 0 and not index.problems


@pytest.mark.parametrize("mode, colour", [("L", 200), ("RGBA", (200, 200, 200, 128))])
def test_grey_and_four_channel_pngs_load_as_rgb(tmp_path, mode, colour):
    folder = tmp_path / "images"
    folder.mkdir()
    Image.new(mode, (96, 64), colour).save(folder / "image.png")
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "image.txt").write_text("0 0.5 0.5 0.5 0.5\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [bud]\n")
    index = load_split(read_data_yaml(tmp_path / "data.yaml"), "val")
    sample = EvalDataset(index.records, 96)[0]
    assert sample.image.shape[0] == 3 and not index.problems
    height, width = sample.image.shape[1:]
    assert sample.image[:, height // 2, width // 2].tolist() == [200, 200, 200]


def test_exif_rotated_jpeg_boxes_follow_the_rotation(tmp_path):
    displayed = np.zeros((120, 200, 3), np.uint8)  # landscape as a viewer shows it, a white block at the right
    displayed[20:60, 140:190] = 255
    stored = Image.fromarray(displayed).transpose(Image.Transpose.ROTATE_90)  # the camera's portrait pixels
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to display"
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "photo.jpg", exif=exif, quality=95)
    (tmp_path / "labels").mkdir()
    # label of the block in the displayed image: centre (165, 40) of 200x120, size 50x40
    (tmp_path / "labels" / "photo.txt").write_text(f"0 {165 / 200} {40 / 120} {50 / 200} {40 / 120}\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [bud]\n")
    record = load_split(read_data_yaml(tmp_path / "data.yaml"), "val").records[0]
    assert (record.height, record.width) == (120, 200)
    sample = EvalDataset([record], 200)[0]
    image = sample.image.numpy().transpose(1, 2, 0)
    _, cx, cy, w, h = sample.labels[0].tolist()
    height, width = image.shape[:2]
    x1, y1, x2, y2 = int((cx - w / 2) * width) + 2, int((cy - h / 2) * height) + 2, int((cx + w / 2) * width) - 2, \
        int((cy + h / 2) * height) - 2
    assert image[y1:y2, x1:x2].mean() > 240  # the box lies on the white block
    assert image.mean() < 60


def test_huge_image_is_resized_and_keeps_its_boxes(tmp_path):
    (tmp_path / "images").mkdir()
    big = np.zeros((6000, 8000, 3), np.uint8)
    big[3000:3600, 4000:4800] = 255
    cv2.imwrite(str(tmp_path / "images" / "big.jpg"), big)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "big.txt").write_text(f"0 {4400 / 8000} {3300 / 6000} {800 / 8000} {600 / 6000}\n")
    (tmp_path / "data.yaml").write_text("train: images\nval: images\nnames: [bud]\n")
    record = load_split(read_data_yaml(tmp_path / "data.yaml"), "val").records[0]
    sample = EvalDataset([record], 320)[0]
    assert max(sample.image.shape[1:]) <= 320 + 32  # longest side 320, plus YOLOv5's rectangular padding
    _, cx, cy, _, _ = sample.labels[0].tolist()
    assert sample.image[:, int(cy * sample.image.shape[1]), int(cx * sample.image.shape[2])].float().mean() > 240


# ---- configuration ------------------------------------------------------------------------------------------------
def test_unknown_model_yaml(synthetic_yaml, tmp_path):
    fails(fit_args(synthetic_yaml, tmp_path) + ["--model.model_cfg", "yolov5q.yaml"], "--model.model_cfg yolov5q.yaml")


def test_class_count_of_data_and_checkpoint_differ(trained, synthetic_yaml, tmp_path):
    _, run = trained
    three = yaml.safe_load(synthetic_yaml.read_text())
    three.update(names=["bud", "leaf", "stem"], nc=3, path=str(synthetic_yaml.parent))
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(three))
    fails(["validate", *FAST, "--data.data_yaml", str(tmp_path / "three.yaml"), "--trainer.default_root_dir",
           str(tmp_path), "--ckpt_path", str(run / "checkpoints" / "best.ckpt")],
          f"--ckpt_path {run / 'checkpoints' / 'best.ckpt'}: model.model.24.m.0.weight",
          "the checkpoint detects 2 classes, this model 3")


def test_ckpt_path_that_is_missing_broken_or_not_a_tea_lightning_checkpoint(trained, synthetic_yaml, tmp_path,
                                                                           monkeypatch):
    _, run = trained
    monkeypatch.chdir(tmp_path)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes((run / "checkpoints" / "best.ckpt").read_bytes()[:300_000])
    official = tmp_path / "official.pt"
    torch.save({"model": None, "epoch": -1}, official)  # a YOLOv5 .pt's layout (its model pickled under "model")
    for path, expected in [(tmp_path / "nope.ckpt", "does not exist"), (truncated, "could not be read"),
                           (Path("last.ckpt"), "does not exist"),  # a file's name, not Lightning's keyword "last"
                           (official, "official YOLOv5 .pt weights go to --model.weights"),
                           (synthetic_yaml, "could not be read")]:
        for command in ("validate", "predict", "fit"):
            fails([command, *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
                   str(tmp_path / "runs"), "--ckpt_path", str(path)], f"--ckpt_path {path}", expected)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("*.ckpt"))


def test_predict_source_missing_or_without_images_fails_before_any_run_folder(synthetic_yaml, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    for source, expected in [(tmp_path / "nope", "does not exist"), (empty, "holds no image file (.jpg, .jpeg")]:
        fails(["predict", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.default_root_dir",
               str(tmp_path / "runs"), "--data.predict_source", str(source)], f"--data.predict_source {source}",
              expected)
    assert not any((tmp_path / "runs").rglob("*"))


def test_pruned_checkpoint_given_to_another_model_config(tmp_path, synthetic_yaml):
    from tea_lightning.model.weights import build_model
    from tea_lightning.pruning.pruner import prune

    model = build_model("yolov5n.yaml", 2)
    prune(model, torch.zeros(1, 3, 128, 128), 0.3)
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "pruned.ckpt")
    fails(fit_args(synthetic_yaml, tmp_path) + ["--model.model_cfg", "yolov5m.yaml", "--model.weights",
                                                str(tmp_path / "pruned.ckpt")],
          f"--model.weights {tmp_path / 'pruned.ckpt'}: model.", "model config and nc it was trained with")


@pytest.mark.parametrize("options, expected", [
    (["--trainer.callbacks.pruning_ratio", "0"], "--trainer.callbacks.pruning_ratio must be between 0 and 1"),
    (["--trainer.callbacks.pruning_ratio", "1"], "--trainer.callbacks.pruning_ratio must be between 0 and 1"),
    (["--trainer.callbacks.schedule", "[0, 4]"], "--trainer.callbacks.schedule has epoch 4"),
    (["--trainer.callbacks.max_layer_ratio", "1.0"], "max_layer_ratio must be between 0 and 1"),
])
def test_bad_pruning_options(synthetic_yaml, tmp_path, options, expected):
    fails(fit_args(synthetic_yaml, tmp_path, epochs=2) + ["--trainer.callbacks+=tea_lightning.ChannelPruning",
                                                           *options], expected)


@pytest.mark.parametrize("args, expected", [
    (["--data.batch_size", "0"], "--data.batch_size must be at least 1 (got 0)"),
    (["--data.workers", "-1"], "--data.workers at least 0 (got -1)"),
    (["--trainer.max_epochs", "-3"], "max_epochs"),  # Lightning's own check, as one error line
    (["--data.augmentation.mosaic", "1.5", "--data.augmentation.hsv_s", "1.5",
      "--data.augmentation.close_mosaic", "-1"],
     "--data.augmentation: mosaic 1.5 (a probability: 0 to 1), hsv_s 1.5 (gains of 1 +/- up to it: 0 to 1), "
     "close_mosaic -1 (at least 0)"),
])
def test_bad_numbers_for_batch_workers_and_epochs(synthetic_yaml, tmp_path, args, expected):
    fails(fit_args(synthetic_yaml, tmp_path) + args, expected)
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.parametrize("args, expected", [
    (["demo", "--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["demo-data", "OUT", "--n-train", "0"], "n_train must be an integer >= 1, got 0"),
    (["demo-data", "OUT", "--image-size", "20"], "image_size must be an integer >= 64"),
])
def test_bad_demo_options(tmp_path, args, expected):
    fails([str(tmp_path / "out") if arg == "OUT" else arg for arg in args], expected)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*.jpg"))


def test_output_folder_that_cannot_be_written(synthetic_yaml, tmp_path):
    (tmp_path / "file").write_text("a file where the output folder should go")
    fails(fit_args(synthetic_yaml, tmp_path / "file" / "runs"), "--trainer.default_root_dir", "cannot be written")
    fails(["demo-data", str(tmp_path / "file")], f"{tmp_path / 'file'} is a file: give a folder")
    read_only = Path("/sys/tea-lightning-runs")  # sysfs refuses new folders, even to root
    if not Path("/sys").is_dir():
        pytest.skip("no /sys on this machine")
    fails(fit_args(synthetic_yaml, read_only), str(read_only), "cannot be written")


# ---- runtime ------------------------------------------------------------------------------------------------------
def run_command(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    # a process group of its own, so that a signal to the run's group never reaches pytest
    return subprocess.run([sys.executable, "-m", "tea_lightning.cli", *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT, env=env, start_new_session=True)


PRUNE_AT_0 = ["--trainer.callbacks+=tea_lightning.ChannelPruning", "--trainer.callbacks.pruning_ratio", "0.3",
              "--trainer.callbacks.schedule", "[0]"]


def test_sigterm_mid_epoch_saves_a_checkpoint_that_resumes_the_pruned_run(synthetic_yaml, tmp_path):
    args = fit_args(synthetic_yaml, tmp_path, epochs=3) + ["--model.weights", str(need(YOLOV5N)), *PRUNE_AT_0]
    stopped = run_command(*args, "--trainer.callbacks+=tests.faults.SignalAt", "--trainer.callbacks.epoch", "1",
                          "--trainer.callbacks.batch", "1", "--trainer.callbacks.signum", str(int(signal.SIGTERM)))
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert "SIGTERM received: stopping after this batch and saving the run.\n" in stopped.stderr  # no Ctrl+C hint
    assert "\nInterrupted by SIGTERM at epoch 1, after 2 batches" in stopped.stderr  # plain text, not a warning
    assert f"--ckpt_path {last}" in stopped.stderr  # the command that continues
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["epoch"] == 1 and saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 2
    shapes = {k: v.shape for k, v in saved["state_dict"].items()}
    assert shapes["model.model.0.conv.weight"][0] < 16  # pruned (YOLOv5n's first conv has 16 outputs)

    resumed = run_command(*args, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Pruning step" not in resumed.stdout + resumed.stderr  # the checkpoint says it was done
    final = torch.load(tmp_path / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 2
    assert {k: v.shape for k, v in final["state_dict"].items()} == shapes  # the same pruned architecture


@pytest.mark.parametrize("times", [1, 2])
def test_ctrl_c_stops_after_the_batch_with_a_checkpoint(synthetic_yaml, tmp_path, times):
    # twice at once: `timeout -s INT` signals the process and then its group, which used to count as a second
    # Ctrl+C ("stop at once, without saving")
    stopped = run_command(*fit_args(synthetic_yaml, tmp_path, epochs=2), "--trainer.callbacks+=tests.faults.SignalAt",
                          "--trainer.callbacks.epoch", "1", "--trainer.callbacks.batch", "0",
                          "--trainer.callbacks.signum", str(int(signal.SIGINT)), "--trainer.callbacks.times",
                          str(times))
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Interrupted by Ctrl+C at epoch 1, after 1 batch of it" in stopped.stderr
    saved = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 1


def test_resuming_a_pruned_fit_without_the_pruning_callback_is_refused(synthetic_yaml, tmp_path):
    # its checkpoints would lose the pruning state, and a resume of them with the callback pruned the model again
    main([*fit_args(synthetic_yaml, tmp_path), *PRUNE_AT_0])
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    fails([*fit_args(synthetic_yaml, tmp_path, epochs=2), "--ckpt_path", str(last)],
          f"--ckpt_path {last} comes from a fit that pruned with ChannelPruning (1 step(s) done)",
          "Resume with the same --trainer.callbacks options", f"--model.weights {last}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["version_0"]  # no run folder left behind


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_to_the_process_group_spares_the_loader_workers(synthetic_yaml, tmp_path, signum):
    # `timeout`, `kill -- -PGID`, SLURM and systemd signal the workers too; one killed by it ended the run in a
    # DataLoader traceback, before the checkpoint was written
    stopped = run_command(*fit_args(synthetic_yaml, tmp_path, epochs=2), "--data.workers", "2",
                          "--trainer.callbacks+=tests.faults.SignalAt", "--trainer.callbacks.epoch", "1",
                          "--trainer.callbacks.batch", "0", "--trainer.callbacks.signum", str(int(signum)),
                          "--trainer.callbacks.group", "true")
    assert stopped.returncode == (143 if signum == signal.SIGTERM else 1), stopped.stderr[-3000:]
    assert "DataLoader worker" not in stopped.stderr
    cause = "SIGTERM" if signum == signal.SIGTERM else "Ctrl+C"
    assert f"Interrupted by {cause} at epoch 1, after 1 batch of it" in stopped.stderr
    saved = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 1


def test_sigterm_to_one_ddp_process_stops_both_at_one_batch_and_resumes(synthetic_yaml, tmp_path):
    # Rank 1 alone is signalled (a worker killed): Lightning's own handling, driven by rank 0, hung here.
    args = fit_args(synthetic_yaml, tmp_path, epochs=3) + [
        "--model.weights", str(need(YOLOV5N)), *PRUNE_AT_0, "--trainer.accelerator", "cpu", "--trainer.devices", "2",
        "--trainer.strategy", "ddp"]
    stopped = run_command(*args, "--trainer.callbacks+=tests.faults.SignalAt", "--trainer.callbacks.epoch", "1",
                          "--trainer.callbacks.batch", "0", "--trainer.callbacks.signum", str(int(signal.SIGTERM)),
                          "--trainer.callbacks.rank", "1")
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert "Interrupted by SIGTERM at epoch 1, after 1 batch of it" in stopped.stderr
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 1
    resumed = run_command(*args, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    final = torch.load(tmp_path / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 2
    assert {k: v.shape for k, v in final["state_dict"].items()} == {k: v.shape for k, v in saved["state_dict"].items()}


def slurm_task(tmp_path: Path, job: str) -> dict:
    """Return the environment of one SLURM task as srun starts it, with an scontrol that records what it is asked
    (in tmp_path/scontrol.txt)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    scontrol = bin_dir / "scontrol"
    scontrol.write_text(f"#!/bin/sh\necho \"$@\" >> {tmp_path / 'scontrol.txt'}\n")
    scontrol.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "SLURM_NTASKS": "1",
            "SLURM_NTASKS_PER_NODE": "1", "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
            "SLURM_JOB_ID": job, "SLURM_JOB_NAME": "tea-test"}


def signalled_in_epoch_1(args: list[str], signum: int, env: dict) -> subprocess.CompletedProcess:
    """Run the fit, sending `signum` to it after the first batch of epoch 1."""
    return run_command(*args, "--trainer.callbacks+=tests.faults.SignalAt", "--trainer.callbacks.epoch", "1",
                       "--trainer.callbacks.batch", "0", "--trainer.callbacks.signum", str(int(signum)), env=env)


def requeued_job_finishes(args: list[str], env: dict, root: Path) -> None:
    """Run the same command again, as SLURM's requeued job does: it resumes from hpc_ckpt_1.ckpt by itself."""
    requeued = run_command(*args, env=env)
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert "hpc_ckpt_1.ckpt" in requeued.stdout + requeued.stderr  # Lightning restored it
    final = torch.load(root / "version_1" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert final["epoch"] == 2


def test_slurm_time_limit_signal_saves_requeues_and_the_requeued_job_resumes_by_itself(synthetic_yaml, tmp_path):
    env = slurm_task(tmp_path, "4242")
    args = fit_args(synthetic_yaml, tmp_path / "runs", epochs=3)
    stopped = signalled_in_epoch_1(args, signal.SIGUSR1, env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "job 4242 is requeued" in stopped.stderr
    saved = torch.load(tmp_path / "runs" / "hpc_ckpt_1.ckpt", map_location="cpu", weights_only=False)
    assert saved["loops"]["fit_loop"]["epoch_loop.batch_progress"]["current"]["completed"] == 1

    requeued_job_finishes(args, env, tmp_path / "runs")


def test_slurm_preemption_is_resumed_by_the_requeued_job_and_not_by_another_job(synthetic_yaml, tmp_path):
    # SIGTERM under SLURM is a preemption: SLURM reruns the script of a --requeue job without --ckpt_path, which
    # used to train again from scratch in the same run folder
    env = slurm_task(tmp_path, "4243")
    args = fit_args(synthetic_yaml, tmp_path / "runs", epochs=3)
    stopped = signalled_in_epoch_1(args, signal.SIGTERM, env)
    assert stopped.returncode == 143, stopped.stderr[-3000:]
    hpc = tmp_path / "runs" / "hpc_ckpt_1.ckpt"
    assert f"saved in {hpc}. If SLURM requeues the job, it resumes from there by itself" in stopped.stderr
    assert not (tmp_path / "scontrol.txt").exists()  # SLURM requeues a preempted job itself

    # another job in the same folder would have continued this run as its own
    other = run_command(*args, "--model.model_cfg", "yolov5s.yaml", env={**env, "SLURM_JOB_ID": "5000"})
    assert other.returncode == 1
    assert "holds hpc_ckpt_1.ckpt, which SLURM job 4243 saved" in other.stderr
    assert f"pass --ckpt_path {hpc}" in other.stderr and "Restoring states" not in other.stderr + other.stdout

    requeued_job_finishes(args, env, tmp_path / "runs")


def test_last_checkpoint_follows_every_epoch_also_one_without_an_optimizer_step(synthetic_yaml, tmp_path):
    # 16 images in batches of 4 and YOLOv5's nominal batch of 64: after the warmup an optimizer step every 4 epochs.
    # Lightning skipped saving when no step was made since the last save, so last.ckpt lagged behind by epochs.
    cli = cli_main([*fit_args(synthetic_yaml, tmp_path, epochs=4), "--model.recipe.nominal_batch_size", "64"])
    saved = torch.load(tmp_path / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert cli.trainer.global_step < 8  # at least one epoch made no optimizer step
    assert saved["epoch"] == 3 and saved["global_step"] == cli.trainer.global_step


def test_kill_9_mid_epoch_loses_at_most_that_epoch(synthetic_yaml, tmp_path):
    args = fit_args(synthetic_yaml, tmp_path, epochs=3)
    killed = run_command(*args, "--trainer.callbacks+=tests.faults.SignalAt", "--trainer.callbacks.epoch", "2",
                         "--trainer.callbacks.batch", "1", "--trainer.callbacks.signum", str(int(signal.SIGKILL)))
    assert killed.returncode == -signal.SIGKILL
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["epoch"] == 1  # epochs 0 and 1 are kept
    assert not list(last.parent.glob("*.partial"))
    resumed = run_command(*args, "--ckpt_path", str(last))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    rows = (tmp_path / "version_1" / "metrics.csv").read_text().splitlines()[1:]
    assert {row.split(",")[0] for row in rows} == {"2"}  # only the lost epoch ran again


def test_a_fit_resumed_into_a_new_folder_keeps_its_best_checkpoint_and_plots(synthetic_yaml, tmp_path, capsys,
                                                                              recwarn):
    # CSVLogger gives the resumed fit a new version folder; Lightning then forgot the best score, so the first
    # epoch after the resume became best.ckpt whatever it scored, and the plots of the best epoch were never written
    args = [*fit_args(synthetic_yaml, tmp_path), "--model.plots", "true", "--trainer.limit_train_batches", "1"]
    main(args)
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=False)
    (key,) = [k for k in saved["callbacks"] if k.startswith("ModelCheckpoint{'monitor': 'val/fitness'")]
    saved["callbacks"][key]["best_model_score"] = torch.tensor(1.0)  # an epoch 0 that no later epoch beats
    torch.save(saved, last)
    recwarn.clear()
    main([*args, "--trainer.max_epochs", "2", "--ckpt_path", str(last)])
    assert not [w for w in recwarn if "dirpath has changed" in str(w.message)]  # the folder changes on purpose
    best = tmp_path / "version_1" / "checkpoints" / "best.ckpt"
    assert torch.load(best, map_location="cpu", weights_only=False)["epoch"] == 0
    out = capsys.readouterr().out
    assert "Best checkpoint (epoch 0: mAP50 " in out and str(best) in out
    assert sorted(p.name for p in (tmp_path / "version_1" / "plots" / "val").iterdir()) == \
        ["F1_curve.png", "PR_curve.png", "P_curve.png", "R_curve.png", "curves.npz"]


def test_disk_full_while_writing_a_checkpoint_keeps_the_earlier_one(synthetic_yaml, tmp_path, monkeypatch):
    import tea_lightning.checkpoints as checkpoints

    real_save = checkpoints.torch.save

    class DiskFullAfter:
        """The checkpoint file on a disk that fills up after `room` bytes."""

        def __init__(self, f, room: int):
            self.f, self.room = f, room

        def write(self, data) -> int:
            if len(data) > self.room:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.room -= len(data)
            return self.f.write(data)

        def flush(self) -> None:
            self.f.flush()

    def save_until_disk_full(checkpoint, f):
        real_save(checkpoint, DiskFullAfter(f, 100_000) if checkpoint["epoch"] >= 1 else f)

    monkeypatch.setattr(checkpoints.torch, "save", save_until_disk_full)
    folder = tmp_path / "version_0" / "checkpoints"
    fails(fit_args(synthetic_yaml, tmp_path, epochs=3), "No space left on device", "are intact", str(folder))
    monkeypatch.undo()
    assert torch.load(folder / "last.ckpt", map_location="cpu", weights_only=False)["epoch"] == 0
    assert sorted(p.name for p in folder.iterdir()) == ["best.ckpt", "last.ckpt"]  # no partial file left


def test_nan_loss_stops_with_step_and_images_and_keeps_the_last_checkpoint(synthetic_yaml, tmp_path):
    message = fails(fit_args(synthetic_yaml, tmp_path, epochs=3) + [
        "--trainer.callbacks+=tests.faults.PoisonWeights", "--trainer.callbacks.epoch", "1",
        "--trainer.callbacks.batch", "2"], "not finite", "epoch 1, batch 2", str(synthetic_yaml.parent / "images"))
    last = tmp_path / "version_0" / "checkpoints" / "last.ckpt"
    assert f"the last good checkpoint is {last}" in message
    state = torch.load(last, map_location="cpu", weights_only=False)
    assert state["epoch"] == 0 and all(torch.isfinite(v).all() for v in state["state_dict"].values()
                                       if v.is_floating_point())


def test_wandb_not_installed_logs_to_csv(synthetic_yaml, tmp_path, monkeypatch, recwarn):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    args = [a for a in fit_args(synthetic_yaml, tmp_path) if a not in ("--trainer.logger", "CSVLogger")]
    main(args)
    assert any("wandb is not installed" in str(w.message) for w in recwarn)
    assert (tmp_path / "tea-lightning" / "version_0" / "metrics.csv").is_file()
    assert (tmp_path / "tea-lightning" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_wandb_failing_to_start_logs_to_csv(synthetic_yaml, tmp_path, monkeypatch, recwarn):
    import wandb

    def refuse(*args, **kwargs):
        raise RuntimeError("wandb service did not start")

    monkeypatch.setattr(wandb, "init", refuse)
    args = [a for a in fit_args(synthetic_yaml, tmp_path) if a not in ("--trainer.logger", "CSVLogger")]
    main(args)
    assert any("W&B could not start (RuntimeError: wandb service did not start)" in str(w.message) for w in recwarn)
    (metrics,) = (tmp_path / "tea-lightning").glob("*/metrics.csv")
    assert (metrics.parent / "checkpoints" / "last.ckpt").is_file()
