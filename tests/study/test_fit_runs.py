"""`tea-lightning report` of fits made by hand: a baseline fit and a pruned fit from its best checkpoint, found by
their run folders, compared as a sweep's steps are; and the folders it cannot use, named."""

import shutil

import pytest
import torch

from tea_lightning.cli import cli_main
from tea_lightning.model.complexity import count_parameters
from tea_lightning.model.weights import read_model
from tea_lightning.study.fit_runs import fit_run_folders, fit_runs, labels_of, pruning_ratio
from tea_lightning.study.report import _first_epoch, report_main, rows_of
from tests.conftest import FAST

PRUNE = ["--trainer.callbacks+=tea_lightning.ChannelPruning", "--trainer.callbacks.pruning_ratio", "0.3",
         "--trainer.callbacks.schedule", "[0]"]


def fit(data, root, epochs, *extra):
    """Fit on the synthetic set into `root` (CSV logging) and return the run folder."""
    cli = cli_main(["fit", *FAST, "--data.data_yaml", str(data), "--model.plots", "true", "--trainer.max_epochs",
                    str(epochs), "--trainer.default_root_dir", str(root), *extra])
    return root / f"version_{cli.trainer.logger.version}"


@pytest.fixture(scope="module")
def by_hand(synthetic_yaml, tmp_path_factory):
    """A 3-epoch baseline in runs/baseline and a 2-epoch fit pruned 0.3 from its best.ckpt in runs/pruned."""
    runs = tmp_path_factory.mktemp("runs")
    baseline = fit(synthetic_yaml, runs / "baseline", 3)
    pruned = fit(synthetic_yaml, runs / "pruned", 2, "--model.weights", str(baseline / "checkpoints" / "best.ckpt"),
                 *PRUNE)
    return runs, baseline, pruned


def table(md: str, section: str) -> list[dict]:
    lines = md.split(f"## {section}")[1].split("\n\n")[1].splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


def test_a_baseline_and_a_pruned_fit_made_by_hand_are_compared(by_hand, tmp_path, capsys):
    runs, baseline, pruned = by_hand
    report_main([str(runs / "baseline"), str(runs / "pruned"), "--out", str(tmp_path), "--latency-runs", "2"])
    printed = capsys.readouterr().out
    assert "[report 1/2] baseline: reading best.ckpt, timing it" in printed and "Report of 2 runs" in printed
    assert "wandb sync" not in printed  # nothing to publish: W&B Reports are made of sweep studies
    md = (tmp_path / "report.md").read_text()
    assert md.startswith("# Pruning study: 2 fit(s) made by hand")
    base_row, pruned_row = table(md, "Before and after fine-tuning")
    assert (base_row["ratio"], base_row["run"], pruned_row["ratio"], pruned_row["run"]) == \
           ("baseline", "baseline", "0.3", "pruned")
    for row, folder in ((base_row, baseline), (pruned_row, pruned)):
        checkpoint = torch.load(folder / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
        scores = checkpoint["validation_summary"]
        assert row["after fine-tuning"] == f"{scores['mAP50']:.4f} / {scores['mAP50-95']:.4f}"
        params = count_parameters(read_model(folder / "checkpoints" / "best.ckpt", "test"))
        assert row["params"].startswith(f"{params:,}")
    assert pruned_row["params"].endswith("(-50%)") and float(pruned_row["PyTorch ms (b1)"].split()[0]) > 0
    every = table(md, "Every run")
    assert [(r["step"], r["job"], r["ratio"]) for r in every] == [("baseline", "fit", "0"), ("pruned", "fit", "0.3")]
    assert float(every[1]["ONNX MB"]) < float(every[0]["ONNX MB"])
    for name in ("tradeoff.png", "curves_yolov5n.png", "losses_yolov5n.png"):
        assert f"]({name})" in md and (tmp_path / name).stat().st_size > 10_000


def test_a_fit_started_from_another_fits_best_checkpoint_is_drawn_after_its_epochs(by_hand):
    runs, _, _ = by_hand
    rows = rows_of(fit_runs([runs], [], latency_runs=0))
    base, pruned = sorted(rows, key=lambda r: r["ratio"])
    assert [len(r["data"].history) for r in (base, pruned)] == [3, 2]  # results.csv's epochs
    assert (_first_epoch(base, rows), _first_epoch(pruned, rows)) == (0, 3)
    assert "latency_pytorch_ms" not in base  # --latency-runs 0: not timed


def test_folders_it_cannot_use_are_named_and_the_others_reported(by_hand, tmp_path, capsys):
    runs, baseline, _ = by_hand
    old, torn = tmp_path / "old" / "version_0", tmp_path / "torn" / "version_0"
    for folder in (old, torn):
        shutil.copytree(baseline, folder)
    checkpoint = torch.load(old / "checkpoints" / "best.ckpt", map_location="cpu", weights_only=False)
    del checkpoint["validation_summary"]  # as early tea-lightning checkpoints are
    torch.save(checkpoint, old / "checkpoints" / "best.ckpt")
    best = torn / "checkpoints" / "best.ckpt"
    best.write_bytes(best.read_bytes()[:1000])  # a copy cut short
    report_main([str(runs), str(tmp_path / "old"), str(tmp_path / "torn"), "--out", str(tmp_path / "report"),
                 "--latency-runs", "0"])
    printed = capsys.readouterr().out
    assert f"Left out of the report: {old / 'checkpoints' / 'best.ckpt'} holds no validation scores" in printed
    assert f"Left out of the report: the run folder's {best} could not be read as a checkpoint" in printed
    assert "Report of 2 runs" in printed


def test_labels_are_the_roots_names_else_with_the_run_folders(tmp_path):
    a, b = tmp_path / "a" / "tea-lightning" / "x1", tmp_path / "b" / "tea-lightning" / "x2"
    assert labels_of([a, b], [tmp_path / "a", tmp_path / "b"]) == ["a", "b"]
    assert labels_of([a, b], [tmp_path]) == [f"{tmp_path.name}/x1", f"{tmp_path.name}/x2"]
    c = tmp_path / "c" / "x1"
    assert labels_of([a, c], [tmp_path]) == [f"{tmp_path.name}/a/tea-lightning/x1", f"{tmp_path.name}/c/x1"]


def test_fit_run_folders_need_a_best_checkpoint_and_a_config_and_leave_sweep_fits_out(tmp_path):
    for name in ("done", "no_config", "sweepid"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
        (tmp_path / name / "checkpoints" / "best.ckpt").touch()
        if name != "no_config":
            (tmp_path / name / "config.yaml").touch()
    assert fit_run_folders([tmp_path], {"sweepid"}) == [tmp_path / "done"]


@pytest.mark.parametrize("state, callback, expected", [
    ({"steps_done": 1, "channel_ratio": None}, {"pruning_ratio": 0.3, "schedule": [0]}, 0.3),
    ({"steps_done": 1, "channel_ratio": 0.364}, {"macs_reduction": 0.49, "schedule": [0]}, 0.364),
    ({"steps_done": 1, "channel_ratio": None}, {"pruning_ratio": 0.5, "schedule": [0, 5]}, 0.27),  # interrupted
    (None, None, 0.27),  # fine-tuned from a pruned checkpoint, without the callback
])
def test_the_ratio_is_the_callbacks_when_it_took_every_step_else_the_measured_one(state, callback, expected):
    callbacks = [{"class_path": "tea_lightning.ChannelPruning", "init_args": callback}] if callback else []
    assert pruning_ratio({"trainer": {"callbacks": callbacks}}, state, measured=0.2712) == expected
