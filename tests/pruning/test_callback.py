"""ChannelPruning during training: scheduled steps, optimizer/EMA rebuilt, pruned checkpoints that reload,
resume after a step, evaluation-only pruning, bf16 and DDP."""

import csv
import logging
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from tea_lightning.cli import TeaCLI, cli_main, trainer_defaults
from tea_lightning.data.datamodule import YoloDataModule
from tea_lightning.errors import ConfigError
from tea_lightning.model.complexity import count_parameters
from tea_lightning.model.detector import Detector
from tea_lightning.model.recipe import ExponentialMovingAverage
from tea_lightning.model.weights import build_model
from tea_lightning.pruning.callback import ChannelPruning
from tea_lightning.pruning.pruner import SparsityRegularizer, output_channels
from tests.conftest import YOLOV5N, need
from tests.conftest import FAST
from tests.model.test_memory_format import convolutions_are_channels_last

PRUNE = ["--trainer.callbacks+=tea_lightning.ChannelPruning", "--trainer.callbacks.pruning_ratio", "0.3"]


def fit(synthetic_yaml, root, *extra):
    return cli_main(["fit", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights", str(need(YOLOV5N)),
                     "--trainer.default_root_dir", str(root), *extra])


def pruning_callback(cli) -> ChannelPruning:
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ChannelPruning)]
    return callback


def losses(run: Path, split: str = "train") -> dict[int, float]:
    with open(run / "metrics.csv") as f:
        return {int(r["epoch"]): sum(float(r[f"{split}/{part}_loss"]) for part in ("box", "obj", "cls"))
                for r in csv.DictReader(f) if r.get(f"{split}/box_loss")}


@pytest.fixture(scope="module")
def pruned_run(synthetic_yaml, tmp_path_factory):
    root = tmp_path_factory.mktemp("pruned")
    unpruned = count_parameters(cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml),
                                          "--trainer.default_root_dir", str(root / "v")]).model.model)
    cli = fit(synthetic_yaml, root, "--trainer.max_epochs", "8", *PRUNE, "--trainer.callbacks.schedule", "[2]")
    return cli, root / "version_0", unpruned


def test_scheduled_step_prunes_as_configured_and_training_goes_on(pruned_run):
    cli, run, unpruned = pruned_run
    params = count_parameters(cli.model.model)
    assert 0.40 < 1 - params / unpruned < 0.65  # ratio 0.3 of channels -> about half the parameters
    # the loss on the fixed validation images: the training loss of 4 augmented batches an epoch wanders by +-10%
    val = losses(run, "val")
    assert val[7] < val[2]
    with open(run / "metrics.csv") as f:
        logged = [r for r in csv.DictReader(f) if r.get("model/params")]
    assert int(float(logged[-1]["model/params"])) == params and float(logged[-1]["model/GFLOPs"]) > 0


def test_optimizer_and_ema_hold_exactly_the_new_parameters(pruned_run):
    cli, _, _ = pruned_run
    optimizer = cli.trainer.optimizers[0]
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for p in cli.model.model.parameters()}
    (ema,) = [c for c in cli.trainer.callbacks if isinstance(c, ExponentialMovingAverage)]
    averaged = ema._average_model.module.model.state_dict()
    assert {k: v.shape for k, v in averaged.items()} == {k: v.shape for k, v in cli.model.model.state_dict().items()}
    assert optimizer.param_groups[1]["lr"] > 0


def test_pruned_layers_keep_the_channels_last_layout_in_training_and_when_reloaded(pruned_run):
    cli, run, _ = pruned_run
    assert convolutions_are_channels_last(cli.model.model)
    assert convolutions_are_channels_last(Detector.from_checkpoint(run / "checkpoints" / "last.ckpt").model)


def test_pruned_checkpoint_validates_to_the_same_metrics(pruned_run, synthetic_yaml, tmp_path):
    cli, run, _ = pruned_run
    saved = float(cli.trainer.checkpoint_callback.best_model_score)
    check = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--ckpt_path",
                      str(run / "checkpoints" / "best.ckpt"), "--trainer.default_root_dir", str(tmp_path)])
    assert check.trainer.callback_metrics["val/fitness"].item() == pytest.approx(saved, abs=1e-6)
    assert count_parameters(check.model.model) == count_parameters(cli.model.model)


def test_a_pruned_checkpoint_as_weights_for_a_data_set_with_other_classes_keeps_all_but_the_head(
        pruned_run, synthetic_yaml, tmp_path, caplog):
    cli, run, _ = pruned_run
    caplog.set_level(logging.INFO)
    three = yaml.safe_load(synthetic_yaml.read_text())
    three.update(names=["bud", "leaf", "stem"], nc=3, path=str(synthetic_yaml.parent))
    (tmp_path / "three.yaml").write_text(yaml.safe_dump(three))
    check = cli_main(["validate", *FAST, "--data.data_yaml", str(tmp_path / "three.yaml"), "--model.weights",
                      str(run / "checkpoints" / "best.ckpt"), "--trainer.default_root_dir", str(tmp_path)])
    pruned, adapted = output_channels(cli.model.model), output_channels(check.model.model)
    heads = {name for name in pruned if re.fullmatch(r"model\.24\.m\.\d", name)}
    assert len(heads) == 3 and {pruned[h] for h in heads} == {3 * (2 + 5)} and {adapted[h] for h in heads} == {3 * 8}
    assert {k: v for k, v in adapted.items() if k not in heads} == {k: v for k, v in pruned.items() if k not in heads}
    total = len(check.model.model.state_dict())
    assert f"Transferred {total - 6}/{total} tensors" in caplog.text  # the heads' weights and biases start afresh


def test_validating_a_pruned_checkpoint_with_the_callback_says_it_does_not_prune_again(pruned_run, synthetic_yaml,
                                                                                       tmp_path, caplog):
    cli, run, _ = pruned_run
    caplog.set_level(logging.INFO)
    check = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--ckpt_path",
                      str(run / "checkpoints" / "best.ckpt"), "--trainer.default_root_dir", str(tmp_path), *PRUNE,
                      "--trainer.callbacks.pruning_ratio", "0.5"])
    assert count_parameters(check.model.model) == count_parameters(cli.model.model)
    assert "Not pruning: the checkpoint was pruned while training (1 step(s) done)" in caplog.text


def test_resume_after_a_pruning_step_does_not_prune_again(pruned_run, synthetic_yaml, tmp_path):
    cli, run, _ = pruned_run
    params = count_parameters(cli.model.model)
    resumed = fit(synthetic_yaml, tmp_path, "--trainer.max_epochs", "10", *PRUNE, "--trainer.callbacks.schedule",
                  "[2]", "--ckpt_path", str(run / "checkpoints" / "last.ckpt"))
    assert resumed.trainer.current_epoch == 10
    assert count_parameters(resumed.model.model) == params
    assert pruning_callback(resumed).steps_done == 1


def test_library_resume_of_a_pruned_checkpoint_without_the_callback_is_refused(pruned_run, synthetic_yaml, tmp_path):
    # the CLI refuses it before any run folder exists (tests/test_faults.py); Trainer.fit from Python gets the same
    _, run, _ = pruned_run
    last = run / "checkpoints" / "last.ckpt"
    cli = TeaCLI(Detector, YoloDataModule, trainer_defaults=trainer_defaults(), auto_configure_optimizers=False,
                 run=False, args=[*FAST, "--data.data_yaml", str(synthetic_yaml), "--trainer.max_epochs", "10",
                                  "--trainer.default_root_dir", str(tmp_path)])
    with pytest.raises(ConfigError, match="comes from a fit that pruned with ChannelPruning"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=str(last))


def test_iterative_steps_end_with_the_architecture_of_one_step(synthetic_yaml, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    one_step = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights",
                         str(need(YOLOV5N)), "--trainer.default_root_dir", str(tmp_path / "once"), *PRUNE]).model
    assert "Pruning step 1/1 before validation: channels -30.0%" in caplog.text  # validate has no epochs
    unpruned_model = cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml),
                               "--trainer.default_root_dir", str(tmp_path / "v")]).model.model
    unpruned = output_channels(unpruned_model)
    cli = fit(synthetic_yaml, tmp_path / "steps", "--trainer.max_epochs", "3", *PRUNE, "--trainer.callbacks.schedule",
              "[0, 1, 2]")
    assert output_channels(cli.model.model) == output_channels(one_step.model)
    assert pruning_callback(cli).state_dict()["original_channels"] == unpruned  # kept for a resumed run
    # the last step says what all of them did together; each step's size is logged with its epoch
    params, before = count_parameters(cli.model.model), count_parameters(unpruned_model)
    assert "Pruning step 3/3 at epoch 2: channels -30.0% of the unpruned model's" in caplog.text
    assert f"; in all, parameters {params / before - 1:+.1%} and GFLOPs -" in caplog.text
    with open(tmp_path / "steps" / "version_0" / "metrics.csv") as f:
        steps = [(r["epoch"], int(float(r["model/params"]))) for r in csv.DictReader(f) if r.get("model/params")]
    assert [epoch for epoch, _ in steps] == ["0", "1", "2"] and steps[-1][1] == params
    hparams = yaml.safe_load((tmp_path / "steps" / "version_0" / "hparams.yaml").read_text())
    assert hparams["model/params"] == params and hparams["model/unpruned_params"] == before


def test_best_checkpoint_is_the_best_model_after_pruning(trained, synthetic_yaml, tmp_path):
    _, trained_run = trained
    cli = fit(synthetic_yaml, tmp_path, "--model.weights", str(trained_run / "checkpoints" / "best.ckpt"),
              "--trainer.max_epochs", "2", *PRUNE, "--trainer.callbacks.schedule", "[1]")
    with open(tmp_path / "version_0" / "metrics.csv") as f:
        fitness = [float(r["val/fitness"]) for r in csv.DictReader(f) if r.get("val/fitness")]
    assert fitness[0] > fitness[1]  # the collapse: by the score alone, the unpruned epoch 0 would stay best
    checkpoint = cli.trainer.checkpoint_callback
    assert float(checkpoint.best_model_score) == pytest.approx(fitness[1])
    best = torch.load(checkpoint.best_model_path, weights_only=False)["state_dict"]
    assert {k: v.shape for k, v in best.items()} == {k: v.shape for k, v in cli.model.state_dict().items()}


def test_pruned_weights_start_a_new_fit(pruned_run, synthetic_yaml, tmp_path):
    cli, run, _ = pruned_run
    again = fit(synthetic_yaml, tmp_path, "--trainer.max_epochs", "1", "--model.weights",
                str(run / "checkpoints" / "best.ckpt"))
    assert count_parameters(again.model.model) == count_parameters(cli.model.model)


def validate_yolov5n(synthetic_yaml, root, *options):
    return cli_main(["validate", *FAST, "--data.data_yaml", str(synthetic_yaml), "--model.weights",
                     str(need(YOLOV5N)), "--trainer.default_root_dir", str(root), *options])


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_validate_prunes_once_before_evaluating(synthetic_yaml, tmp_path, importance):
    base = validate_yolov5n(synthetic_yaml, tmp_path / "a")
    pruned = validate_yolov5n(synthetic_yaml, tmp_path / "b", *PRUNE, "--trainer.callbacks.importance", importance)
    assert count_parameters(pruned.model.model) < 0.6 * count_parameters(base.model.model)
    assert all(p.grad is None for p in pruned.model.parameters())  # Taylor's gradients are not left behind


def test_a_ratio_the_layer_cap_cannot_reach_says_what_was_removed(synthetic_yaml, tmp_path, caplog):
    pruned = validate_yolov5n(synthetic_yaml, tmp_path, "--trainer.callbacks+=tea_lightning.ChannelPruning",
                              "--trainer.callbacks.pruning_ratio", "0.95")
    before = sum(m.num_features for m in build_model("yolov5n.yaml", nc=2).modules()
                 if isinstance(m, torch.nn.BatchNorm2d))
    after = sum(m.num_features for m in pruned.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    said = re.search(r"channels -95.0% of the unpruned model's asked, ([\d.]+)% removed \(as much as max_layer_ratio "
                     r"0.9, round_to 8 and ignored_layers let go\)", caplog.text)
    assert said and float(said.group(1)) == pytest.approx((1 - after / before) * 100, abs=0.05)
    assert float(said.group(1)) < 90
    caplog.clear()
    validate_yolov5n(synthetic_yaml, tmp_path / "b", *PRUNE)  # within a point of what was asked: nothing to add
    assert "Pruning step 1/1" in caplog.text and "asked" not in caplog.text


@pytest.mark.parametrize("importance", ["l2", "taylor"])
def test_a_macs_target_is_met_with_every_criterion(synthetic_yaml, tmp_path, importance, caplog):
    # finding the channel ratio for a MACs target prunes trial copies, which Taylor ranks by the loss gradients
    base = validate_yolov5n(synthetic_yaml, tmp_path / "a")
    pruned = validate_yolov5n(synthetic_yaml, tmp_path / "b", "--trainer.callbacks+=tea_lightning.ChannelPruning",
                              "--trainer.callbacks.macs_reduction", "0.4", "--trainer.callbacks.global_pruning", "true",
                              "--trainer.callbacks.importance", importance)
    after, before = pruned.model.model_summary()["model/GFLOPs"], base.model.model_summary()["model/GFLOPs"]
    assert after / before == pytest.approx(0.6, abs=0.03)
    reached = re.search(r"GFLOPs [\d.]+ -> [\d.]+ \(([-+\d.]+)%; macs_reduction asked -40.0%\)", caplog.text)
    assert reached and float(reached.group(1)) == pytest.approx((after / before - 1) * 100, abs=0.1)


@pytest.mark.parametrize("config", sorted((Path(__file__).parents[2] / "configs" / "prune").glob("*.yaml")),
                         ids=lambda path: path.stem)
def test_shipped_pruning_configs_prune_as_they_say(synthetic_yaml, tmp_path, config):
    cli = cli_main(["validate", *FAST, "--config", str(config), "--data.data_yaml", str(synthetic_yaml),
                    "--trainer.default_root_dir", str(tmp_path)])
    stated = yaml.safe_load(config.read_text())["trainer"]["callbacks"][0]["init_args"]
    callback = pruning_callback(cli)
    assert callback.pruning_ratio == stated["pruning_ratio"] and callback.steps_done == 1
    assert callback.prune_options["importance"] == stated["importance"]


def test_bf16_mixed_precision_on_cpu_prunes_and_trains(synthetic_yaml, tmp_path):
    cli = fit(synthetic_yaml, tmp_path, "--trainer.max_epochs", "2", "--trainer.precision", "bf16-mixed", *PRUNE,
              "--trainer.callbacks.schedule", "[1]")
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(tmp_path / "version_0").values())
    assert pruning_callback(cli).steps_done == 1


def test_sparsity_penalty_acts_on_every_step_before_the_last_pruning_step_only(synthetic_yaml, tmp_path,
                                                                             monkeypatch):
    calls = []  # the parameter count of the model each penalty was applied to

    def record(regularizer):
        calls.append(count_parameters(regularizer.model))
        original(regularizer)

    original = SparsityRegularizer.regularize
    monkeypatch.setattr(SparsityRegularizer, "regularize", record)
    cli = fit(synthetic_yaml, tmp_path, "--trainer.max_epochs", "3", *PRUNE, "--trainer.callbacks.schedule", "[2]",
              "--trainer.callbacks.sparsity", "0.01")
    steps_per_epoch = cli.trainer.global_step // 3  # the fast recipe steps the optimizer after every batch
    assert steps_per_epoch > 0 and len(calls) == 2 * steps_per_epoch  # epochs 0 and 1, not after pruning
    assert min(calls) > count_parameters(cli.model.model)  # all on the unpruned model


def test_sparsity_needs_epochs_before_the_last_pruning_step():
    with pytest.raises(ValueError, match=r"sparsity 0.01 acts in the epochs before the last pruning step"):
        ChannelPruning(sparsity=0.01, schedule=[0])  # it would never act
    assert ChannelPruning(sparsity=0.01, schedule=[0, 3]).sparsity == 0.01


@pytest.mark.parametrize("option, value, expected", [
    ("pruning_ratio", "0", "between 0 and 1"), ("pruning_ratio", "1.0", "between 0 and 1"),
    ("schedule", "[5]", "schedule has epoch 5"),
    ("schedule", "[]", r"one or more increasing epochs >= 0 \(e.g. \[0\]\)"),
    ("sparsity", "-0.1", "sparsity must be >= 0"),
    ("max_layer_ratio", "1.5", "max_layer_ratio must be between 0 and 1"),
    ("round_to", "0", "round_to must be a positive number"),
    ("ignored_layers", "[model.99]", "ignored_layers: ignored layer 'model.99' is not a module"),
])
def test_bad_pruning_options_are_clear_errors_before_any_training(synthetic_yaml, tmp_path, option, value, expected):
    with pytest.raises(ValueError, match=expected):  # the last pruning step is at epoch 1: errors come before it
        fit(synthetic_yaml, tmp_path, "--trainer.max_epochs", "2", *PRUNE, "--trainer.callbacks.schedule", "[1]",
            f"--trainer.callbacks.{option}", value)
    assert not list(tmp_path.rglob("*.ckpt"))


def test_ddp_two_processes_prune_identically_step_together_and_checkpoint_once(synthetic_yaml, tmp_path):
    script = Path(__file__).with_name("ddp_prune.py")
    result = subprocess.run([sys.executable, str(script), str(synthetic_yaml), str(need(YOLOV5N)), str(tmp_path)],
                            capture_output=True, text=True, timeout=600, cwd=Path(__file__).parents[2])
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys()
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # same architecture, same weights
    pruned = sum(v.numel() for k, v in ranks[0].items() if k.startswith("model."))
    assert pruned < 0.8 * count_parameters(build_model("yolov5n.yaml", nc=2))  # and pruned
    assert ranks[0]["steps_done"].item() == 1
    # 16 images / (2 processes x 4) = 2 batches per epoch, 6 in 3 epochs; warmup (4 iterations) ramps the
    # accumulation from 1 to 16 / (4 x 2) = 2: steps after iterations 0, 1, 3 and 5. Accumulating as one process
    # would (up to 16 / 4 = 4) gives 2 steps.
    assert ranks[0]["optimizer_steps"].item() == ranks[1]["optimizer_steps"].item() == 4
    writes = [line.split() for line in (tmp_path / "writes.txt").read_text().splitlines()]
    assert {rank for rank, _ in writes} == {"0"}  # written once, by rank 0
    assert [name for _, name in writes].count("last.ckpt") == 3 and ["0", "best.ckpt"] in writes
    # what is printed comes once, from rank 0, and every epoch-level figure is synced over the processes (Lightning
    # warns about each one that is not)
    assert result.stdout.count("Run folder:") == 1 and "version_None" not in result.stdout
    assert "sync_dist=True" not in result.stderr
