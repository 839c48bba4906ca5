"""The module and data module used from Python, with a plain Lightning Trainer (no CLI to link their settings)."""

import logging

import pytest
import pytorch_lightning as pl
import torch

from tea_lightning import Detector, YoloDataModule
from tea_lightning.data.transforms import Augmentation
from tea_lightning.errors import ConfigError


def tiny(root) -> pl.Trainer:
    """A one-batch Trainer writing under `root` (without a logger, the run folder is the root folder)."""
    return pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False, default_root_dir=root,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def data(synthetic_yaml) -> YoloDataModule:
    return YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0)


def test_a_checkpoint_of_a_detector_built_in_python_loads_with_torchs_safe_default(synthetic_yaml, tmp_path):
    # the default Recipe() was pickled into the hyperparameters, which torch.load's weights_only=True (Lightning's
    # resume, validate(ckpt_path=...), load_from_checkpoint) refuses: "Unsupported global ... Recipe"
    dm = data(synthetic_yaml)
    trainer = tiny(tmp_path)
    trainer.fit(Detector(nc=dm.nc, names=dm.names, img_size=64, batch_size=4), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "a.ckpt")
    saved = torch.load(tmp_path / "a.ckpt", map_location="cpu")  # weights_only=True
    assert saved["hyper_parameters"]["recipe"]["lr0"] == 0.01
    reloaded = Detector.load_from_checkpoint(tmp_path / "a.ckpt")
    assert reloaded.recipe.lr0 == 0.01 and reloaded.hparams.nc == dm.nc


def test_a_recipe_given_as_a_dict_is_checked():
    assert Detector(nc=2, recipe={"lr0": 0.02}).recipe.lr0 == 0.02
    with pytest.raises(ConfigError, match="recipe: .*'lr'.* the fields are those of tea_lightning.model.recipe.Recipe"):
        Detector(nc=2, recipe={"lr": 0.02})


@pytest.mark.parametrize("settings, stage, differ", [
    ({"nc": 80}, "fit", r"nc=80 \(data: 2\)"),
    ({"img_size": 640, "batch_size": 16}, "fit", r"img_size=640 \(data: 64\), batch_size=16 \(data: 4\)"),
    ({"nc": 3}, "validate", r"nc=3 \(data: 2\)"),
])
def test_a_detector_whose_settings_differ_from_the_data_is_refused(synthetic_yaml, tmp_path, settings, stage,
                                                                  differ):
    # the CLI links them; from Python the defaults (80 classes, 640, batch 16) trained with the wrong loss gains
    # and accumulation without a word, or failed deep in the metrics
    dm = data(synthetic_yaml)
    model = Detector(**{"nc": dm.nc, "names": None, "img_size": 64, "batch_size": 4, **settings})
    with pytest.raises(ConfigError, match=differ + " differ from the data module's: build it with Detector"):
        getattr(tiny(tmp_path), stage)(model, datamodule=dm)


def test_evaluation_takes_another_image_and_batch_size_than_training(synthetic_yaml, tmp_path):
    dm = data(synthetic_yaml)
    (results,) = tiny(tmp_path).validate(Detector(nc=dm.nc, img_size=640, batch_size=16), datamodule=dm)
    assert "val/mAP50" in results


def test_load_from_checkpoint_needs_none_of_the_files_the_run_started_from(synthetic_yaml, tmp_path):
    # Lightning rebuilds the module from its saved arguments: it read the `weights` and `teacher` files again, so a
    # checkpoint could not be loaded once they were moved, although every tensor is in the checkpoint
    dm = data(synthetic_yaml)
    start = tmp_path / "start.ckpt"
    trainer = tiny(tmp_path)
    trainer.fit(Detector(nc=dm.nc, img_size=64, batch_size=4), datamodule=dm)
    trainer.save_checkpoint(start)
    trainer = tiny(tmp_path)
    trainer.fit(Detector(nc=dm.nc, img_size=64, batch_size=4, weights=str(start), teacher=str(start)), datamodule=dm)
    trainer.save_checkpoint(tmp_path / "run.ckpt")
    start.unlink()
    reloaded = Detector.load_from_checkpoint(tmp_path / "run.ckpt")
    saved = torch.load(tmp_path / "run.ckpt", map_location="cpu")["state_dict"]
    assert all(torch.equal(reloaded.state_dict()[key], value) for key, value in saved.items())


def test_close_mosaic_turns_the_mosaic_off_for_the_last_epochs_of_a_fit(synthetic_yaml, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0,
                        augmentation=Augmentation(close_mosaic=2))
    trainer = pl.Trainer(max_epochs=4, limit_train_batches=1, limit_val_batches=0, logger=False,
                         default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False)
    trainer.fit(Detector(nc=dm.nc, img_size=64, batch_size=4), datamodule=dm)
    closing = [r.getMessage() for r in caplog.records if "the mosaic is off" in r.getMessage()]
    assert closing == ["Epoch 2: the mosaic is off for the last 2 epochs (--data.augmentation.close_mosaic)."]


def test_a_fit_resumed_into_its_closed_mosaic_epochs_starts_without_the_mosaic(synthetic_yaml, tmp_path):
    # the loader and its workers' first batches come before Lightning updates current_epoch, which on a resume from
    # an epoch-end checkpoint is still the finished epoch's
    def fit(epochs: int, folder: str, ckpt_path=None) -> list[bool]:
        seen = []
        record = pl.callbacks.LambdaCallback(
            on_train_start=lambda trainer, _: seen.append(trainer.train_dataloader.dataset.mosaic_closed))
        dm = YoloDataModule(str(synthetic_yaml), img_size=64, batch_size=4, workers=0,
                            augmentation=Augmentation(close_mosaic=2))
        last = pl.callbacks.ModelCheckpoint(tmp_path / folder, save_last=True)
        trainer = pl.Trainer(max_epochs=epochs, limit_train_batches=1, limit_val_batches=0, logger=False,
                             default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False,
                             callbacks=[record, last])
        trainer.fit(Detector(nc=dm.nc, img_size=64, batch_size=4), datamodule=dm, ckpt_path=ckpt_path)
        return seen

    assert fit(4, "fresh") == [False]
    fit(2, "first")  # epochs 0 and 1, last.ckpt saved at the end of each
    assert fit(4, "resumed", ckpt_path=tmp_path / "first" / "last.ckpt") == [True]  # epoch 2 of 4: the last two


def test_each_epoch_starts_from_clean_gradients_without_a_validation_between(synthetic_yaml, tmp_path):
    # YOLOv5 zeroes the gradients at each epoch's start: those of an unfinished accumulation are dropped. Without a
    # validation (which makes Lightning clear them) they carried into the next epoch's first optimizer step.
    def gradients_at_batch_start(trainer, module, batch, batch_idx):
        grads = [p.grad for p in module.parameters() if p.grad is not None]
        seen.append((trainer.current_epoch, sum(float(g.abs().sum()) for g in grads)))

    seen = []
    dm = data(synthetic_yaml)
    trainer = pl.Trainer(max_epochs=2, limit_train_batches=3, limit_val_batches=0, logger=False,
                         default_root_dir=tmp_path, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[pl.callbacks.LambdaCallback(on_train_batch_start=gradients_at_batch_start)])
    # no warmup: YOLOv5's accumulation to a nominal batch of 64 is 16 batches of 4 from the first, so neither
    # epoch's 3 batches reach an optimizer step
    recipe = {"warmup_epochs": 0, "warmup_min_iterations": 0}
    trainer.fit(Detector(nc=dm.nc, img_size=64, batch_size=4, recipe=recipe), datamodule=dm)
    assert [epoch for epoch, _ in seen] == [0, 0, 0, 1, 1, 1]
    assert seen[0][1] == 0 and seen[1][1] > 0  # gradients accumulate within an epoch
    assert seen[3][1] == 0  # and are gone when the next one starts
