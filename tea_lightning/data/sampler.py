"""Distributed evaluation without duplicated images and with the batches a single process would make."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import DistributedSampler

from tea_lightning.data.labels import DataError


class WholeBatchSampler(DistributedSampler):
    """Deals the batches of the single-process order to the processes in turn (batch i to rank i % world).

    Lightning's DistributedSampler pads the data set with repeated images so that every rank gets as many, and
    interleaves images across ranks; repeated images count twice in mAP, and different batches mean different
    letterbox padding, so the DDP metric would not equal the one-process metric. Here every image is evaluated
    once, in the very batch it would have on one process; ranks may get one batch more or less. With fewer batches
    than processes the images are split as evenly as possible instead, so that no rank is left without data
    (its metric would otherwise wait forever for the others).
    """

    def __init__(self, dataset, batch_size: int, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        size = len(dataset)
        if size < num_replicas:
            raise DataError(f"{size} evaluation images cannot be shared by {num_replicas} processes (each needs at "
                            "least one): evaluate on fewer devices or with more images.")
        starts = range(0, size, batch_size)
        if len(starts) >= num_replicas:
            batches = [np.arange(s, min(s + batch_size, size)) for s in starts]
        else:
            batches = np.array_split(np.arange(size), num_replicas)
        self.indices = [int(i) for batch in batches[rank::num_replicas] for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
