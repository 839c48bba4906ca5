"""Two CPU processes (gloo) against one: the same mAP and losses on the same checkpoint and data, no image counted
twice."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tea_lightning.cli import cli_main
from tea_lightning.data.synthetic import make_synthetic_dataset
from tests.conftest import FAST

ROOT = Path(__file__).resolve().parents[1]


def test_ddp_validation_equals_one_process(trained, tmp_path):
    _, run = trained
    checkpoint = run / "checkpoints" / "best.ckpt"
    # 10 images in evaluation batches of 4 (4, 4, 2): rank 0 gets the first two, rank 1 the last (uneven on
    # purpose; Lightning's own sampler would repeat an image to even them out).
    data = make_synthetic_dataset(tmp_path / "data", n_train=4, n_val=10, image_size=128, seed=1)
    for label in sorted((data.parent / "labels" / "val").glob("*.txt"))[-2:]:
        label.write_text("")  # rank 1 evaluates background images only, and must still log what rank 0 logs
    single = cli_main(["validate", *FAST, "--data.data_yaml", str(data), "--data.batch_size", "2",
                       "--ckpt_path", str(checkpoint), "--trainer.default_root_dir", str(tmp_path / "one")])
    expected = {k: float(v) for k, v in single.trainer.callback_metrics.items()}
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "ddp_validate.py"), str(data), str(checkpoint),
                             str(tmp_path / "two")], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [json.loads((tmp_path / "two" / f"metrics{r}.json").read_text()) for r in (0, 1)]
    assert [r.pop("images") for r in ranks] == [8, 2]
    assert expected["val/mAP50"] > 0.2  # a model that detects, so that equality means something
    for key in ("val/mAP50", "val/mAP50-95", "val/precision", "val/recall", "val/f1", "val/yolov5_mAP50",
                "val/box_loss", "val/obj_loss", "val/cls_loss"):
        assert ranks[0][key] == pytest.approx(expected[key], abs=1e-4), key
        assert ranks[1][key] == pytest.approx(expected[key], abs=1e-4), key
