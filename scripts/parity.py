"""Run tea-lightning and YOLOv5's own scripts on the same weights, data and machine; print both sets of figures.

    python scripts/parity.py eval  --weights W.pt --data DATA.yaml --img 640
    python scripts/parity.py train --weights yolov5n.pt --data DATA.yaml --epochs 30 --batch 8 --img 416 \
        [--reference-run runs/ref/n30]   # reuse a finished `yolov5 train` run instead of training again
    python scripts/parity.py speed --weights yolov5n.pt --data DATA.yaml --epochs 3 --batch 8 --img 416

YOLOv5 runs from the virtual environment made by scripts/make_reference_venv.sh ($REF_VENV, default .refvenv).
The output is a Markdown table for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tea_lightning.cli import cli_main  # noqa: E402

ALL_ROW = re.compile(r"^\s+all\s+(\d+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", re.M)
ITERATIONS = re.compile(r"(\d+)/(\d+) \[[\d:]+<[\d:]+,\s+([\d.]+)(it/s|s/it)\]")


def reference_env() -> dict:
    """Return the environment YOLOv5's scripts need here: its venv first on PATH, nothing fetched at run time."""
    venv = Path(os.environ.get("REF_VENV", ROOT / ".refvenv")).resolve()
    if not (venv / "bin" / "yolov5").exists():
        sys.exit(f"No YOLOv5 reference venv at {venv}: run scripts/make_reference_venv.sh first.")
    return {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1",
            "YOLO_OFFLINE": "1", "YOLO_AUTOINSTALL": "False", "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled",
            "COMET_MODE": "disabled"}


def absolute_data_yaml(data: Path, out: Path) -> Path:
    """Return the data.yaml of a copy of the data set under `out`, with `path:` set: YOLOv5 resolves relative paths
    from its own folder and writes label caches beside the labels, which must not touch the original."""
    copy = out / "data"
    shutil.copytree(data.parent, copy, dirs_exist_ok=True)
    lines = [line for line in data.read_text().splitlines() if not line.startswith("path:")]
    (copy / "data.yaml").write_text(f"path: {copy.resolve()}\n" + "\n".join(lines) + "\n")
    return copy / "data.yaml"


def yolov5_val(weights: Path, data: Path, img: int, batch: int, out: Path) -> dict:
    """Return P, R, mAP50, mAP50-95 and wall time of `yolov5 val`."""
    command = ["yolov5", "val", "--data", str(absolute_data_yaml(data, out)), "--weights", str(weights), "--img",
               str(img), "--batch-size", str(batch), "--conf-thres", "0.001", "--iou-thres", "0.6", "--device",
               "cpu", "--project", str(out), "--name", "val", "--exist-ok"]
    start = time.time()
    result = subprocess.run(command, env=reference_env(), capture_output=True, text=True)
    seconds = time.time() - start
    match = ALL_ROW.search(result.stdout + result.stderr)
    if not match:
        sys.exit(f"yolov5 val printed no result row:\n{result.stderr[-3000:]}")
    p, r, m50, m = map(float, match.groups()[2:])
    return {"precision": p, "recall": r, "mAP50": m50, "mAP50-95": m, "seconds": seconds, "command": " ".join(command)}


def ours_validate(weights: Path, data: Path, img: int, batch: int, out: Path) -> dict:
    """Return the same figures from `tea-lightning validate` with the same weights."""
    args = ["validate", "--config", str(ROOT / "configs" / "yolov5n.yaml"), "--data.data_yaml", str(data),
            "--model.weights", str(weights), "--data.img_size", str(img), "--data.batch_size", str(batch // 2),
            "--trainer.logger", "CSVLogger", "--trainer.default_root_dir", str(out / "ours")]
    start = time.time()
    metrics = cli_main(args).trainer.callback_metrics
    seconds = time.time() - start
    figures = {k: float(metrics[f"val/{k}"]) for k in ("precision", "recall", "mAP50", "mAP50-95")}
    return {**figures, "seconds": seconds, "command": "tea-lightning " + " ".join(args)}


def yolov5_train(weights: Path, data: Path, epochs: int, batch: int, img: int, out: Path,
                 reference_run: Path | None) -> dict:
    """Return the final and best mAP and the training speed of `yolov5 train` (run now, or read from a run)."""
    command = ["yolov5", "train", "--data", str(absolute_data_yaml(data, out)), "--cfg", "yolov5n.yaml",
               "--weights", str(weights), "--epochs", str(epochs), "--batch-size", str(batch), "--img", str(img),
               "--workers", "2", "--device", "cpu", "--seed", "0", "--project", str(out), "--name", "train"]
    if reference_run is None:
        reference_run = out / "train"
        start = time.time()
        log = subprocess.run(command, env=reference_env(), capture_output=True, text=True)
        (out / "yolov5_train.log").write_text(log.stdout + log.stderr)
        wall = time.time() - start
    else:
        wall = float("nan")
    rows = list(csv.DictReader(open(reference_run / "results.csv"), skipinitialspace=True))
    rows = [{k.strip(): v for k, v in row.items()} for row in rows]
    best = max(rows, key=lambda r: 0.1 * float(r["metrics/mAP_0.5"]) + 0.9 * float(r["metrics/mAP_0.5:0.95"]))
    log_file = out / "yolov5_train.log" if (out / "yolov5_train.log").exists() else None
    rates = []
    if log_file:  # tqdm's last rate of each epoch's 'n/n' line
        for done, total, rate, unit in ITERATIONS.findall(log_file.read_text().replace("\r", "\n")):
            if done == total and int(total) > 3:
                rates.append(float(rate) if unit == "it/s" else 1 / float(rate))
    return {"mAP50": float(best["metrics/mAP_0.5"]), "mAP50-95": float(best["metrics/mAP_0.5:0.95"]),
            "best_epoch": int(best["epoch"]), "images_per_s": sorted(rates)[len(rates) // 2] * batch if rates
            else float("nan"), "wall_s": wall, "command": " ".join(command)}


def ours_train(weights: Path, data: Path, epochs: int, batch: int, img: int, out: Path) -> dict:
    """Return the best epoch's mAP, a re-validation of best.ckpt and the training speed of `tea-lightning fit`."""
    args = ["fit", "--config", str(ROOT / "configs" / "yolov5n.yaml"), "--data.data_yaml", str(data),
            "--model.weights", str(weights), "--data.img_size", str(img), "--data.batch_size", str(batch),
            "--trainer.max_epochs", str(epochs), "--trainer.default_root_dir", str(out / "ours"),
            "--trainer.logger", "CSVLogger", "--seed_everything", "0"]
    start = time.time()
    fit = cli_main(args)
    wall = time.time() - start
    best = fit.trainer.checkpoint_callback.best_model_path
    with open(Path(best).parents[1] / "metrics.csv") as f:
        rates = sorted(float(r["train/images_per_s"]) for r in csv.DictReader(f) if r.get("train/images_per_s"))
    check = cli_main(["validate", *args[1:], "--ckpt_path", best]).trainer.callback_metrics
    return {"mAP50": float(check["val/mAP50"]), "mAP50-95": float(check["val/mAP50-95"]),
            "images_per_s": rates[len(rates) // 2], "wall_s": wall, "best": best,
            "command": "tea-lightning " + " ".join(args)}


def header() -> str:
    """Return the machine and date line every table is given with."""
    return (f"{datetime.date.today()}, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["eval", "train", "speed"])
    parser.add_argument("--weights", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--img", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "parity")
    parser.add_argument("--reference-run", type=Path)
    options = parser.parse_args()
    options.out.mkdir(parents=True, exist_ok=True)
    print(header())
    if options.what == "eval":
        ref = yolov5_val(options.weights, options.data, options.img, options.batch, options.out)
        ours = ours_validate(options.weights, options.data, options.img, options.batch, options.out)
        print("| tool | P | R | mAP50 | mAP50-95 | wall s |\n|---|---|---|---|---|---|")
        for name, r in (("YOLOv5 val.py", ref), ("tea-lightning validate", ours)):
            print(f"| {name} | {r['precision']:.3f} | {r['recall']:.3f} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | "
                  f"{r['seconds']:.0f} |")
    else:
        ref = yolov5_train(options.weights, options.data, options.epochs, options.batch, options.img, options.out,
                           options.reference_run)
        ours = ours_train(options.weights, options.data, options.epochs, options.batch, options.img, options.out)
        if options.what == "speed":
            print("| tool | training images/s (median epoch) | fit wall s, validation included |\n|---|---|---|")
            for name, r in (("YOLOv5 train.py", ref), ("tea-lightning fit", ours)):
                print(f"| {name} | {r['images_per_s']:.1f} | {r['wall_s']:.0f} |")
        else:
            print("| tool | best mAP50 | best mAP50-95 | train images/s | wall s |\n|---|---|---|---|---|")
            for name, r in (("YOLOv5 train.py", ref), ("tea-lightning fit", ours)):
                print(f"| {name} | {r['mAP50']:.4f} | {r['mAP50-95']:.4f} | {r['images_per_s']:.1f} | "
                      f"{r['wall_s']:.0f} |")
    print(f"\nYOLOv5: `{ref['command']}`\ntea-lightning: `{ours['command']}`")


if __name__ == "__main__":
    main()
