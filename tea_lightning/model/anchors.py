"""YOLOv5's AutoAnchor at the start of a fit: the model's anchors are checked against the training boxes and, when
fewer than 98% of the boxes could be matched by one, replaced by anchors evolved for the data set (k-means, then a
genetic search). The work is the yolov5 package's `check_anchors`; this module feeds it our image records."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from tea_lightning.data.labels import ImageRecord


def check_anchors_fit(model: nn.Module, records: list[ImageRecord], img_size: int, anchor_t: float) -> bool:
    """Check (and where they fit poorly, evolve) the anchors of a YOLOv5 model for the boxes of `records` at
    `img_size`, printing YOLOv5's AutoAnchor lines; return whether the anchors changed."""
    from yolov5.utils.autoanchor import check_anchors

    labelled = [r for r in records if len(r.boxes)]
    if not labelled:  # background images only: no box to fit
        return False
    # what check_anchors reads of YOLOv5's dataset: image (width, height) and [cls, cx, cy, w, h] labels
    dataset = SimpleNamespace(shapes=np.array([[r.width, r.height] for r in labelled], dtype=np.float64),
                              labels=[r.boxes for r in labelled])
    head = model.model[-1]
    before = head.anchors.clone()
    # its random draws (box scale jitter, the genetic search) come from the global generators: put them back, so that
    # a seeded fit's other random streams are the same whether the check ran or not
    numpy_state, python_state = np.random.get_state(), random.getstate()
    try:
        check_anchors(dataset, model, thr=anchor_t, imgsz=img_size)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    changed = not torch.equal(before, head.anchors)
    if changed:
        forget_cached_grids(head)
    return changed


def forget_cached_grids(head: nn.Module) -> None:
    """Drop the Detect head's grids cached by earlier forward passes: they hold the old anchors (YOLOv5 rebuilds
    them only when the feature map's size changes)."""
    head.grid = [torch.empty(0) for _ in range(head.nl)]
    head.anchor_grid = [torch.empty(0) for _ in range(head.nl)]
