"""YOLOv5's AMP check: mixed precision is kept when it agrees with FP32 and dropped, with a warning, when not."""

import math

import pytest

from tea_lightning.cli import cli_main
from tests.conftest import FAST


def fit(synthetic_yaml, tmp_path, *extra):
    return cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "1",
                     "--trainer.precision", "bf16-mixed", "--trainer.default_root_dir", str(tmp_path), *extra])


def test_bf16_on_cpu_passes_the_check_and_stays_mixed(synthetic_yaml, tmp_path, recwarn):
    cli = fit(synthetic_yaml, tmp_path)
    assert cli.trainer.precision == "bf16-mixed"
    assert not [w for w in recwarn if "AMP check failed" in str(w.message)]


def test_broken_mixed_precision_falls_back_to_fp32_and_trains(synthetic_yaml, tmp_path):
    with pytest.warns(UserWarning, match=r"AMP check failed: with --trainer.precision bf16-mixed .* differs from "
                                         r"FP32 by inf .* continues in FP32"):
        cli = fit(synthetic_yaml, tmp_path, "--trainer.callbacks+=tests.faults.BrokenAutocast")
    assert cli.trainer.precision == "32-true"
    assert math.isfinite(cli.trainer.callback_metrics["train/box_loss"].item())
