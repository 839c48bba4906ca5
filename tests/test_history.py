"""Each epoch's figures: a line per epoch in logs that are not a terminal, results.csv and plots/results.png when fit
ends, all with the figures metrics.csv holds for that epoch, and a resumed fit's files cover every epoch."""

import csv
import io
import re

import matplotlib.image

from tea_lightning.cli import cli_main
from tea_lightning.history import EpochHistory
from tests.conftest import FAST


def fit(synthetic_yaml, root, epochs, *extra):
    return cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", str(epochs),
                     "--trainer.default_root_dir", str(root), *extra])


def logged(run) -> tuple[dict, dict]:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    return ({int(r["epoch"]): r for r in rows if r.get("train/box_loss")},
            {int(r["epoch"]): r for r in rows if r.get("val/mAP50-95")})


def test_each_epoch_prints_its_losses_and_validation_when_output_is_not_a_terminal(synthetic_yaml, tmp_path, capsys):
    fit(synthetic_yaml, tmp_path, 2)
    lines = re.findall(r"^Epoch (\d)/1: box ([\d.]+) obj [\d.]+ cls [\d.]+ mAP50 [\d.]+ mAP50-95 ([\d.]+) P [\d.]+ "
                       r"R [\d.]+ \(\d+ s\)$", capsys.readouterr().out, re.M)
    trained, validated = logged(tmp_path / "version_0")
    assert [int(epoch) for epoch, *_ in lines] == [0, 1]
    for epoch, box, map50_95 in lines:  # the epoch's own figures, not the previous epoch's
        assert box == f"{float(trained[int(epoch)]['train/box_loss']):.4f}"
        assert map50_95 == f"{float(validated[int(epoch)]['val/mAP50-95']):.4f}"


def test_results_csv_and_png_cover_every_epoch_of_a_resumed_fit(synthetic_yaml, tmp_path):
    fit(synthetic_yaml, tmp_path, 2)
    resumed = fit(synthetic_yaml, tmp_path, 3, "--ckpt_path", str(tmp_path / "version_0" / "checkpoints" / "last.ckpt"))
    run = tmp_path / "version_1"  # CSVLogger starts a new version folder for the resumed fit
    with open(run / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in results] == [0, 1, 2]
    trained, validated = {}, {}
    for version in ("version_0", "version_1"):
        t, v = logged(tmp_path / version)
        trained.update(t)
        validated.update(v)
    for row in results:
        epoch = int(row["epoch"])
        assert float(row["train/obj_loss"]) == float(trained[epoch]["train/obj_loss"])
        assert float(row["val/mAP50"]) == float(validated[epoch]["val/mAP50"])
    height, width, _ = matplotlib.image.imread(run / "plots" / "results.png").shape
    assert width > 1500 and height > 600
    assert resumed.trainer.current_epoch == 3


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_printed_to_a_terminal_where_the_progress_bar_shows_the_figures(synthetic_yaml, tmp_path):
    cli = fit(synthetic_yaml, tmp_path, 1, "--trainer.limit_train_batches", "1")
    (history,) = [c for c in cli.trainer.callbacks if isinstance(c, EpochHistory)]
    history.stream = Terminal()
    history.on_train_epoch_end(cli.trainer, cli.model)
    assert history.stream.getvalue() == ""
