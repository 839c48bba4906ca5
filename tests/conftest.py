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
