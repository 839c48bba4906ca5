"""Datasets that turn image records into tensors: augmented squares for training, letterboxed rectangles for
evaluation (YOLOv5's `rect` validation), and the collate function that batches them."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from pytorch_lightning.utilities import rank_zero_info
from torch.utils.data import Dataset, get_worker_info

from tea_lightning.data.labels import ImageRecord
from tea_lightning.data.transforms import PAD_VALUE, Augmentation, TrainTransform, letterbox, read_rgb, \
    rect_shape, resize_longest


@dataclass
class Sample:
    """One image ready for the model, with what is needed to map its boxes back to the original image."""

    image: torch.Tensor  # (3, H, W) uint8
    labels: torch.Tensor  # (n, 5) [cls, cx, cy, w, h], normalised to this image
    path: str
    original_shape: tuple[int, int]  # (height, width) of the file as displayed
    ratio: float  # resize factor from the original image to the letterboxed one
    pad: tuple[float, float]  # (left, top) padding in pixels


class TrainDataset(Dataset):
    """Training images with YOLOv5's augmentation; each mosaic draws three more images at random."""

    def __init__(self, records: list[ImageRecord], img_size: int, augmentation: Augmentation, rank: int = 0):
        self.records, self.img_size, self.augmentation = records, img_size, augmentation
        self.transform = TrainTransform(img_size, augmentation)
        self.rank = rank  # the training process's global rank: DDP processes share torch's seed
        self._rng: np.random.Generator | None = None
        # The loader's worker processes keep their copy of the dataset for the whole fit (persistent workers): the
        # switch lives in shared memory, so that set_epoch in the training process reaches them.
        self._mosaic_closed = torch.zeros((), dtype=torch.bool).share_memory_()

    @property
    def mosaic_closed(self) -> bool:
        """Whether samples are drawn without the mosaic now (`set_epoch`)."""
        return bool(self._mosaic_closed)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Turn the mosaic off for the last `augmentation.close_mosaic` of `epochs`, here and in the loader workers
        (call it before the epoch's batches are drawn). `epochs` below 1 (no epoch limit) never turns it off."""
        closed = epochs > 0 and epoch >= epochs - self.augmentation.close_mosaic
        if closed and not self._mosaic_closed:
            rank_zero_info(f"Epoch {epoch}: the mosaic is off for the last {epochs - epoch} epochs "
                           "(--data.augmentation.close_mosaic).")
        self._mosaic_closed.fill_(closed)

    def __len__(self) -> int:
        return len(self.records)

    def _generator(self) -> np.random.Generator:
        """Return this process's random generator, seeded by torch and the rank so that each DDP process, loader
        worker and epoch augments differently."""
        if self._rng is None:
            info = get_worker_info()
            seed = np.random.SeedSequence([(info.seed if info else torch.initial_seed()) % 2**32, self.rank])
            self._rng = np.random.default_rng(seed)
            # forked workers inherit albumentations' generators: without a reseed they would all augment alike
            self.transform.reseed(int(seed.generate_state(1)[0]))
        return self._rng

    def _load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        record = self.records[index]
        return resize_longest(read_rgb(record.image), self.img_size, augment=True), record.boxes

    def __getitem__(self, index: int) -> Sample:
        rng = self._generator()
        image, boxes = self._load(index)
        others = []
        if not self._mosaic_closed and rng.random() < self.augmentation.mosaic:
            others = [self._load(int(i)) for i in rng.integers(0, len(self.records), size=3)]
        image, labels = self.transform(image, boxes, others)
        record = self.records[index]
        return Sample(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), torch.from_numpy(labels),
                      str(record.image), (record.height, record.width), 1.0, (0.0, 0.0))


class EvalDataset(Dataset):
    """Images letterboxed to YOLOv5's rectangular validation shapes (longest side `img_size`), no augmentation.

    As in YOLOv5's rect batches, the images are sorted by aspect ratio and every image of a batch (of `batch_size`,
    the loader's, in this order) is centred in the same shape, that of the batch's most extreme aspect ratio.
    """

    def __init__(self, records: list[ImageRecord], img_size: int, batch_size: int = 1, stride: int = 32,
                 pad: float = 0.5):
        self.records = sorted(records, key=lambda r: r.height / r.width)
        self.img_size = img_size
        aspects = [r.height / r.width for r in self.records]
        self.batch_size = batch_size
        self.batch_shapes = [rect_shape(aspects[start:start + batch_size], img_size, stride, pad)
                             for start in range(0, len(aspects), batch_size)]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        record = self.records[index]
        image = resize_longest(read_rgb(record.image), self.img_size, augment=False)
        load_ratio = image.shape[0] / record.height
        image, ratio, (dw, dh) = letterbox(image, self.batch_shapes[index // self.batch_size])
        h, w = image.shape[:2]
        labels = torch.from_numpy(record.boxes.copy())
        if len(labels):  # boxes normalised to the original image -> to the padded letterbox
            gain = load_ratio * ratio
            labels[:, 1] = (labels[:, 1] * record.width * gain + dw) / w
            labels[:, 2] = (labels[:, 2] * record.height * gain + dh) / h
            labels[:, 3] *= record.width * gain / w
            labels[:, 4] *= record.height * gain / h
        return Sample(torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))), labels, str(record.image),
                      (record.height, record.width), load_ratio * ratio, (dw, dh))


def collate(samples: list[Sample]) -> dict:
    """Return a batch: images (B, 3, H, W) uint8 padded to the largest, targets (N, 6) [image, cls, cx, cy, w, h]
    normalised to the batch size, and per-image paths, original shapes, ratios and paddings."""
    height = max(s.image.shape[1] for s in samples)
    width = max(s.image.shape[2] for s in samples)
    images = torch.full((len(samples), 3, height, width), PAD_VALUE, dtype=torch.uint8)
    targets = []
    for i, s in enumerate(samples):
        h, w = s.image.shape[1:]
        images[i, :, :h, :w] = s.image
        labels = s.labels.clone()
        labels[:, [1, 3]] *= w / width
        labels[:, [2, 4]] *= h / height
        targets.append(torch.cat([torch.full((len(labels), 1), float(i)), labels], dim=1))
    return {
        "images": images,
        "targets": torch.cat(targets) if targets else torch.zeros((0, 6)),
        "paths": [s.path for s in samples],
        "original_shapes": torch.tensor([s.original_shape for s in samples], dtype=torch.float32),
        "ratios": torch.tensor([s.ratio for s in samples], dtype=torch.float32),
        "pads": torch.tensor([s.pad for s in samples], dtype=torch.float32),
    }
