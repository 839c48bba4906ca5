"""YOLOv5's AutoAnchor at the start of a fit: the model's anchors are checked against the training boxes and, when
fewer than 98% of the boxes could be matched by one, replaced by anchors evolved for the data set (k-means, then a
genetic search). The work is the yolov5 package's `check_anchors`; this module feeds it our image records and
shares its result between DDP processes."""

from __future__ import annotations

import random
from types import SimpleNamespace
from unittest.mock import patch

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import nn

from tea_lightning.data.labels import ImageRecord


def check_anchors_fit(model: nn.Module, records: list[ImageRecord], img_size: int, anchor_t: float) -> bool:
    """Check (and where they fit poorly, evolve) the anchors of a YOLOv5 model for the boxes of `records` at
    `img_size`, printing YOLOv5's AutoAnchor lines; return whether the anchors changed."""
    from yolov5.utils import autoanchor

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
        # unwrapped: yolov5's TryExcept decorator would swallow a Ctrl+C along with real errors; its "AutoAnchor: "
        # prefix plain, without the ANSI colour codes that show up as escape sequences in log files
        with patch.object(autoanchor, "PREFIX", "AutoAnchor: "):
            autoanchor.check_anchors.__wrapped__(dataset, model, thr=anchor_t, imgsz=img_size)
    except Exception as err:  # a failed search is not worth stopping the fit: the anchors stay as they were
        rank_zero_warn(f"AutoAnchor failed ({err!r}); the fit goes on with the model's anchors.")
        head.anchors.copy_(before)
    finally:
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    if torch.equal(before, head.anchors):
        return False
    # the precision they are saved in (half precision, as YOLOv5's train.py rounds them right after the search), so
    # that an exported model decodes boxes with the anchors it was trained with
    head.anchors.copy_(head.anchors.half().float())
    forget_cached_grids(head)
    return True


def fit_anchors(trainer: pl.Trainer, model: nn.Module, records: list[ImageRecord], img_size: int,
                anchor_t: float) -> bool:
    """Run `check_anchors_fit` on the first process (one set of lines, one random search) and give every process its
    anchors; return whether they changed. Every process must call it (it is a collective under DDP)."""
    head = model.model[-1]
    changed = trainer.is_global_zero and check_anchors_fit(model, records, img_size, anchor_t)
    # on the CPU: an object broadcast unpickles a CUDA tensor onto the sender's GPU on every process
    anchors, changed = trainer.strategy.broadcast((head.anchors.cpu(), changed), src=0)
    if changed and not trainer.is_global_zero:
        head.anchors.copy_(anchors.to(head.anchors.device))
        forget_cached_grids(head)
    return changed


def forget_cached_grids(head: nn.Module) -> None:
    """Drop the Detect head's grids cached by earlier forward passes: they hold the old anchors (YOLOv5 rebuilds
    them only when the feature map's size changes)."""
    head.grid = [torch.empty(0) for _ in range(head.nl)]
    head.anchor_grid = [torch.empty(0) for _ in range(head.nl)]
