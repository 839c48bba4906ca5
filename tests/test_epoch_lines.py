"""A line per epoch in logs that are not a terminal, with the figures metrics.csv holds for that epoch."""

import csv
import io
import re

from tea_lightning.cli import cli_main
from tea_lightning.epoch_lines import EpochLines
from tests.conftest import FAST


def test_each_epoch_prints_its_losses_and_validation_when_output_is_not_a_terminal(synthetic_yaml, tmp_path, capsys):
    cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "2",
              "--trainer.default_root_dir", str(tmp_path)])
    lines = re.findall(r"^Epoch (\d)/1: box ([\d.]+) obj [\d.]+ cls [\d.]+ mAP50 [\d.]+ mAP50-95 ([\d.]+) P [\d.]+ "
                       r"R [\d.]+ \(\d+ s\)$", capsys.readouterr().out, re.M)
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    logged = {int(r["epoch"]): r for r in rows if r.get("train/box_loss")}
    validated = {int(r["epoch"]): r for r in rows if r.get("val/mAP50-95")}
    assert [int(epoch) for epoch, *_ in lines] == [0, 1]
    for epoch, box, map50_95 in lines:  # the epoch's own figures, not the previous epoch's
        assert box == f"{float(logged[int(epoch)]['train/box_loss']):.4f}"
        assert map50_95 == f"{float(validated[int(epoch)]['val/mAP50-95']):.4f}"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_nothing_is_printed_to_a_terminal_where_the_progress_bar_shows_the_figures(synthetic_yaml, tmp_path):
    terminal = Terminal()
    cli = cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "1",
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.limit_train_batches", "1"])
    (lines,) = [c for c in cli.trainer.callbacks if isinstance(c, EpochLines)]
    lines.stream = terminal
    lines.on_train_epoch_start(cli.trainer, cli.model)
    lines.on_train_epoch_end(cli.trainer, cli.model)
    assert terminal.getvalue() == ""
