"""The LightningDataModule: a YOLO `data.yaml` in, training/validation/test/predict loaders out."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import cv2
import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import DataLoader

from tea_lightning.data.dataset import EvalDataset, TrainDataset, collate
from tea_lightning.data.labels import IMAGE_SUFFIXES, DataError, ImageRecord, SplitIndex, load_split, \
    read_data_yaml, read_image_size
from tea_lightning.data.sampler import WholeBatchSampler
from tea_lightning.data.transforms import Augmentation
from tea_lightning.errors import ConfigError

log = logging.getLogger(__name__)


def _worker_init(_: int) -> None:
    # OpenCV's own threads would fight the loader processes and the model for the same few cores.
    cv2.setNumThreads(0)
    # Whether to stop is the training process's decision (SaveOnInterrupt stops after the batch and saves): `kill` of
    # the process group, `timeout`, systemd and SLURM signal every process of the job, and a worker killed by the
    # signal ended the run in a DataLoader traceback before anything was saved. A worker whose training process is
    # gone still exits (PyTorch's loader workers watch their parent).
    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):  # SIGUSR1: SLURM's time-limit warning
        if hasattr(signal, name):  # Windows has no SIGUSR1
            signal.signal(getattr(signal, name), signal.SIG_IGN)


class YoloDataModule(pl.LightningDataModule):
    """Loads a YOLO data set (boxes or polygons) described by a `data.yaml`.

    Args:
        data_yaml: path of the YOLO data.yaml (train, val, optional test, names).
        img_size: training size and longest side of validation images (a multiple of 32).
        batch_size: images per batch and process (validation uses twice as many, like YOLOv5).
        workers: loader processes per training process.
        augmentation: YOLOv5's augmentation strengths (`hyp.scratch-low.yaml` by default).
        cache_dir: where label checks are cached (default ~/.cache/tea-lightning or $TEA_LIGHTNING_CACHE).
        predict_source: an image file or folder for `predict`.
    """

    def __init__(self, data_yaml: str, img_size: int = 640, batch_size: int = 16, workers: int = 2,
                 augmentation: Augmentation = Augmentation(), cache_dir: str | None = None,
                 predict_source: str | None = None):
        super().__init__()
        if img_size % 32:
            raise DataError(f"--data.img_size {img_size} must be a multiple of 32 (the model's largest stride).")
        if batch_size < 1 or workers < 0:
            raise ConfigError(f"--data.batch_size must be at least 1 (got {batch_size}) and --data.workers at least 0 "
                              f"(got {workers}).")
        self.spec = read_data_yaml(data_yaml)
        self.img_size, self.batch_size, self.workers = img_size, batch_size, workers
        self.augmentation = augmentation
        self.cache_dir = Path(cache_dir) if cache_dir else None
        # listed now, so that a wrong path fails before the run folder is made
        self.predict_images = _source_images(Path(predict_source)) if predict_source is not None else None
        self.predict_source = predict_source
        self.indexes: dict[str, SplitIndex] = {}

    @property
    def nc(self) -> int:
        """Return the number of classes."""
        return self.spec.nc

    @property
    def names(self) -> list[str]:
        """Return the class names."""
        return self.spec.names

    def split(self, name: str) -> SplitIndex:
        """Return the checked index of a split, reporting its problems once."""
        if name not in self.indexes:
            index = load_split(self.spec, name, self.cache_dir)
            rank_zero_info(index.summary(name, self.names))
            self.indexes[name] = index
        return self.indexes[name]

    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        sampler = None
        trainer = self.trainer
        if not shuffle and trainer is not None and trainer.world_size > 1:
            sampler = WholeBatchSampler(dataset, batch_size, trainer.world_size, trainer.global_rank)
        # page-locked batches copy to a GPU faster and while it computes (YOLOv5 pins too); pointless on a CPU
        pin_memory = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, num_workers=self.workers,
                          collate_fn=collate, worker_init_fn=_worker_init, persistent_workers=self.workers > 0,
                          pin_memory=pin_memory, drop_last=False)

    def _evaluation_loader(self, records: list[ImageRecord], batch_size: int) -> DataLoader:
        """Return a loader of unaugmented images in YOLOv5's rectangular batches of `batch_size`."""
        return self._loader(EvalDataset(records, self.img_size, batch_size), batch_size, shuffle=False)

    def train_dataloader(self) -> DataLoader:
        """Return the augmented, shuffled training loader."""
        rank = self.trainer.global_rank if self.trainer is not None else 0
        dataset = TrainDataset(self.split("train").records, self.img_size, self.augmentation, rank)
        if self.trainer is not None:  # a fit resumed in its last epochs starts without the mosaic
            dataset.set_epoch(_epoch_to_train(self.trainer), self.trainer.max_epochs)
        return self._loader(dataset, self.batch_size, shuffle=True)

    def importance_dataloader(self, images: int) -> DataLoader:
        """Return `images` training images spread over the split, unaugmented and in a fixed order.

        Every process gets the same batches (no distributed sampler, no random augmentation), so that a pruning
        criterion that reads gradients (Taylor) chooses the same channels on every rank without communication.
        """
        records = self.split("train").records
        chosen = records[::max(1, len(records) // images)][:images]
        return DataLoader(EvalDataset(chosen, self.img_size, self.batch_size), batch_size=self.batch_size,
                          shuffle=False, num_workers=0, collate_fn=collate)

    def val_dataloader(self) -> DataLoader:
        """Return the validation loader (rectangular letterbox, no augmentation)."""
        return self._evaluation_loader(self.split("val").records, self.batch_size * 2)

    def test_dataloader(self) -> DataLoader:
        """Return the test loader: the `test` split, or `val` when the yaml has none."""
        name = "test" if "test" in self.spec.splits else "val"
        if name == "val":
            rank_zero_info(f"{self.spec.yaml_path} has no test split: testing on the val split.")
        return self._evaluation_loader(self.split(name).records, self.batch_size * 2)

    def predict_dataloader(self) -> DataLoader:
        """Return a loader over `predict_source` (an image or a folder), or over the validation split."""
        if self.predict_source is None:
            records = self.split("val").records
        else:
            records = _unlabelled_records(self.predict_images, self.predict_source)
        # each image letterboxed to its own shape, as YOLOv5's detect.py does: its boxes do not depend on which
        # images share its batch
        return self._loader(EvalDataset(records, self.img_size), self.batch_size, shuffle=False)

    def dataset_info(self) -> dict:
        """Return what the run config records about the data: yaml, classes and image counts."""
        return {"data_yaml": str(self.spec.yaml_path), "nc": self.nc, "names": self.names,
                "img_size": self.img_size, "batch_size": self.batch_size}


def _epoch_to_train(trainer: pl.Trainer) -> int:
    """Return the epoch the fit's first training batches belong to.

    Lightning builds the training loader (and its workers start drawing batches) before it brings `current_epoch` up
    to date on a resume: from a checkpoint saved at an epoch's end it is still that epoch's number. The loop's
    progress counters are already restored: an epoch that was started and whose last batch ran is over, although a
    checkpoint saved right after that batch (every_n_train_steps) has not counted it as processed.
    """
    epochs = trainer.fit_loop.epoch_progress.current
    last_batch_ran = trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
    return epochs.processed + int(epochs.started > epochs.processed and last_batch_ran)


def _source_images(source: Path) -> list[Path]:
    """Return the image files at `source` (an image, or a folder searched with its subfolders)."""
    if source.is_dir():
        images = sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DataError(f"--data.predict_source {source} holds no image file ({', '.join(IMAGE_SUFFIXES)})"
                            ": give an image file or a folder of images.")
        return images
    if source.is_file():
        return [source]
    raise DataError(f"--data.predict_source {source} does not exist: give an image file or a folder of images.")


def _unlabelled_records(images: list[Path], source: str) -> list[ImageRecord]:
    """Return records without boxes for every readable one of `images` (from `source`); unreadable ones are skipped
    loudly."""
    records = []
    for image in images:
        try:
            height, width = read_image_size(image)
        except Exception as err:  # PIL raises many types for corrupt files
            log.warning("Skipping unreadable image %s (%s)", image, err)
            continue
        records.append(ImageRecord(image, height, width, np.zeros((0, 5), np.float32), "none"))
    if not records:
        raise DataError(f"no readable image in --data.predict_source {source}.")
    return records
