"""Distributed evaluation without duplicated images and with the batches a single process would make."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler

from tea_lightning.data.labels import DataError


class WholeBatchSampler(DistributedSampler):
    """Splits the batches of the single-process order into one consecutive run per process (rank 0 the first).

    Lightning's DistributedSampler pads the data set with repeated images so that every rank gets as many, and
    interleaves images across ranks; repeated images count twice in mAP, and different batches mean different
    letterbox padding, so the DDP metric would not equal the one-process metric. Here every image is evaluated
    once, in the very batch it would have on one process; ranks may get one batch more or less. Consecutive runs
    keep the single-process order when the metric joins the processes' results in rank order, which matters where
    detections tie in score (common in half precision): AP ranks tied detections in the order they arrived. With
    fewer batches than processes the longest batches are halved until every rank has a part of one, so that no
    rank is left without data (its metric would otherwise wait forever for the others) and no rank's batch mixes
    images of two single-process batches (each has its own rectangular shape; mixed, they would be padded apart).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)
        if size < num_replicas:
            raise DataError(f"{size} evaluation images cannot be shared by {num_replicas} processes (each needs at "
                            "least one): evaluate on fewer devices or with more images.")
        parts = [range(start, min(start + batch_size, size)) for start in range(0, size, batch_size)]
        while len(parts) < num_replicas:  # size >= num_replicas, so the longest part has two images or more
            longest = max(range(len(parts)), key=lambda i: len(parts[i]))
            half = (len(parts[longest]) + 1) // 2
            parts[longest:longest + 1] = [parts[longest][:half], parts[longest][half:]]
        self.indices = [i for part in np.array_split(np.arange(len(parts)), num_replicas)[rank] for i in parts[part]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
