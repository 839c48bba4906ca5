"""The shipped configs reach every install: the wheel carries them, and README's `--config configs/...` finds them
from any folder."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tea_lightning import CONFIG_DIR
from tea_lightning.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_carries_every_shipped_config(tmp_path):
    source = tmp_path / "source"  # a copy: building writes build/ and egg-info folders beside the sources
    shutil.copytree(ROOT / "tea_lightning", source / "tea_lightning", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(source)], check=True)
    (wheel,) = tmp_path.glob("*.whl")
    packaged = {name for name in zipfile.ZipFile(wheel).namelist() if name.startswith("tea_lightning/configs/")}
    shipped = {f"tea_lightning/configs/{path.relative_to(CONFIG_DIR).as_posix()}"
               for path in CONFIG_DIR.rglob("*.yaml")}
    assert len(shipped) >= 10 and packaged == shipped


def test_the_repository_configs_folder_is_the_packages(tmp_path):
    assert (ROOT / "configs").resolve() == CONFIG_DIR


def _printed_config(capsys, *args):
    with pytest.raises(SystemExit) as stop:
        main(["fit", *args, "--print_config"])
    assert stop.value.code in (0, None)
    return capsys.readouterr()


def test_a_configs_path_missing_here_falls_back_to_the_installed_copy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    printed = _printed_config(capsys, "-c", "configs/yolov5n.yaml", "--config=configs/prune/ratio_03.yaml")
    assert f"configs/yolov5n.yaml is not in {tmp_path}: using the copy installed with tea-lightning, " \
           f"{CONFIG_DIR / 'yolov5n.yaml'}" in printed.err
    assert str(CONFIG_DIR / "prune" / "ratio_03.yaml") in printed.err
    assert "model_cfg: yolov5n.yaml" in printed.out and "pruning_ratio: 0.3" in printed.out


def test_a_configs_file_in_the_working_folder_wins(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "yolov5n.yaml").write_text("model:\n  model_cfg: yolov5s.yaml\n")
    printed = _printed_config(capsys, "--config", "configs/yolov5n.yaml")
    assert "installed" not in printed.err and "model_cfg: yolov5s.yaml" in printed.out


def test_a_missing_config_that_is_not_shipped_stays_an_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(["fit", "--config", "configs/yolov5x.yaml"])
    assert stop.value.code == 2 and "configs/yolov5x.yaml" in capsys.readouterr().err
