"""Shared fixtures: a small synthetic data set, the shared real data set and weights when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
TEA_SHOOTS = SHARED / "data" / "tea_shoots" / "data.yaml"
YOLOV5N = SHARED / "weights" / "yolov5n.pt"

# Small images, small batches, a short warmup and milder augmentation, so that a few CPU seconds show learning.
FAST = ["--model.model_cfg", "yolov5n.yaml", "--data.img_size", "128", "--data.batch_size", "4",
        "--data.workers", "0", "--data.augmentation.mosaic", "0", "--data.augmentation.scale", "0.2",
        "--trainer.logger", "CSVLogger", "--trainer.enable_progress_bar", "false",
        "--trainer.enable_model_summary", "false", "--model.recipe.nominal_batch_size", "4",
        "--model.recipe.lr0", "0.02", "--model.recipe.warmup_min_iterations", "4",
        "--model.recipe.warmup_epochs", "1", "--model.plots", "false"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    """Keep data set caches out of the user's home folder."""
    monkeypatch.setenv("TEA_LIGHTNING_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def synthetic_yaml(tmp_path_factory) -> Path:
    """Return the data.yaml of a small synthetic data set (shared by the tests that only read it)."""
    from tea_lightning.data.synthetic import make_synthetic_dataset

    return make_synthetic_dataset(tmp_path_factory.mktemp("synthetic"), n_train=16, n_val=8, image_size=128,
                                  seed=1)


def need(path: Path) -> Path:
    """Return the path, or skip the test when the shared file is not there."""
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


@pytest.fixture(scope="session")
def trained(synthetic_yaml, tmp_path_factory):
    """Fit YOLOv5n (COCO weights) on the synthetic set for a few epochs; return the CLI and its run folder."""
    from tea_lightning.cli import cli_main

    root = tmp_path_factory.mktemp("fit")
    cli = cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights", str(need(YOLOV5N)),
                    "--trainer.max_epochs", "30", "--trainer.default_root_dir", str(root)])
    return cli, root / "version_0"
