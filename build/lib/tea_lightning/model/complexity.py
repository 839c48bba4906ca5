"""Model size and cost: parameters and GFLOPs at a given image size."""

from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters."""
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def gflops(model: nn.Module, img_size: int) -> float:
    """Return GFLOPs (2 x multiply-accumulates, as YOLOv5 reports) of one img_size x img_size image."""
    was_training = model.training
    model.eval()  # a training-mode forward would update the BatchNorm statistics
    try:
        device = next(model.parameters()).device
        macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, 3, img_size, img_size, device=device))
    finally:
        model.train(was_training)
    return macs_to_gflops(macs)


def macs_to_gflops(macs: float) -> float:
    """Return GFLOPs as YOLOv5 reports them: two floating-point operations per multiply-accumulate."""
    return 2 * macs / 1e9
