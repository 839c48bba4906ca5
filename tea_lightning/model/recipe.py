"""YOLOv5's training recipe: parameter groups, nominal-batch accumulation, warmup, LR schedule, EMA and loss gains.

The schedule is a pure function of (epoch, iteration) applied before every batch, so an optimizer rebuilt after
pruning or restored from a checkpoint is always at the right place in it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import WeightAveraging
from torch import nn
from torch.optim.swa_utils import AveragedModel


@dataclass
class Recipe:
    """Optimisation hyperparameters; defaults are YOLOv5's `hyp.scratch-low.yaml` and `train.py`.

    Args:
        optimizer: SGD (with Nesterov momentum, YOLOv5's default) or AdamW.
        lr0: initial learning rate.
        lrf: final learning rate, as a fraction of lr0, reached at the last epoch.
        momentum: SGD momentum (AdamW's beta1, fixed: as in YOLOv5, only SGD's momentum warms up).
        weight_decay: weight decay of the convolution weights, scaled with the nominal batch as YOLOv5 scales it.
        warmup_epochs: epochs of warmup (fractions allowed), in which the learning rate, the biases' learning rate
            and the momentum move to their training values.
        warmup_min_iterations: the least number of warmup iterations, whatever warmup_epochs gives.
        warmup_momentum: SGD's momentum at the start of warmup.
        warmup_bias_lr: learning rate of the biases at the start of warmup.
        cos_lr: a cosine learning-rate schedule instead of the linear one.
        nominal_batch_size: images per optimizer step: gradients accumulate over batches up to it.
        grad_clip_norm: the gradient norm is clipped to this.
        ema_decay: decay of the exponential moving average of the weights.
        ema_tau: how many optimizer steps the EMA decay takes to ramp up (decay x (1 - exp(-steps / tau))).
        box: gain of the box loss.
        cls: gain of the class loss (scaled with the class count and detection layers).
        cls_pw: positive weight of the class loss's binary cross-entropy.
        obj: gain of the objectness loss (scaled with the image size and detection layers).
        obj_pw: positive weight of the objectness loss's binary cross-entropy.
        anchor_t: a target matches an anchor when their width and height ratios are under this.
        fl_gamma: focal loss gamma (0: plain binary cross-entropy).
        label_smoothing: label smoothing epsilon of the class targets.
    """

    optimizer: Literal["SGD", "AdamW"] = "SGD"
    lr0: float = 0.01
    lrf: float = 0.01
    momentum: float = 0.937
    weight_decay: float = 0.0005
    warmup_epochs: float = 3.0
    warmup_min_iterations: int = 100
    warmup_momentum: float = 0.8
    warmup_bias_lr: float = 0.1
    cos_lr: bool = False
    nominal_batch_size: int = 64
    grad_clip_norm: float = 10.0
    ema_decay: float = 0.9999
    ema_tau: float = 2000.0
    box: float = 0.05
    cls: float = 0.5
    cls_pw: float = 1.0
    obj: float = 1.0
    obj_pw: float = 1.0
    anchor_t: float = 4.0
    fl_gamma: float = 0.0
    label_smoothing: float = 0.0

    def loss_hyperparameters(self, nc: int, num_layers: int, img_size: int) -> dict:
        """Return the `model.hyp` dict ComputeLoss reads, with gains scaled as YOLOv5's train.py scales them."""
        return {
            "box": self.box * 3 / num_layers,
            "cls": self.cls * nc / 80 * 3 / num_layers,
            "obj": self.obj * (img_size / 640) ** 2 * 3 / num_layers,
            "cls_pw": self.cls_pw, "obj_pw": self.obj_pw, "anchor_t": self.anchor_t,
            "fl_gamma": self.fl_gamma, "label_smoothing": self.label_smoothing,
        }

    def as_dict(self) -> dict:
        """Return the recipe as a plain dict (for run configs)."""
        return asdict(self)


def accumulation_steps(batch_size: int, world_size: int, nominal_batch_size: int) -> int:
    """Return how many batches make one optimizer step so that a step sees about the nominal batch."""
    return max(round(nominal_batch_size / (batch_size * world_size)), 1)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Return YOLOv5's three groups: biases (no decay), weights (decay), normalisation weights (no decay)."""
    biases, weights, norm_weights = [], [], []
    norm_types = tuple(v for k, v in vars(nn).items() if "Norm" in k and isinstance(v, type))
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if name == "bias":
                biases.append(param)
            elif name == "weight" and isinstance(module, norm_types):
                norm_weights.append(param)
            else:
                weights.append(param)
    # Group 0 must stay the biases: warmup gives it its own starting learning rate.
    return [{"params": biases, "weight_decay": 0.0}, {"params": weights, "weight_decay": weight_decay},
            {"params": norm_weights, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, recipe: Recipe, batch_size: int, world_size: int) -> torch.optim.Optimizer:
    """Return the optimizer over YOLOv5's parameter groups, weight decay scaled to the accumulated batch."""
    accumulate = accumulation_steps(batch_size, world_size, recipe.nominal_batch_size)
    decay = recipe.weight_decay * batch_size * world_size * accumulate / recipe.nominal_batch_size
    groups = parameter_groups(model, decay)
    if recipe.optimizer == "SGD":
        optimizer = torch.optim.SGD(groups, lr=recipe.lr0, momentum=recipe.momentum, nesterov=True)
    else:
        optimizer = torch.optim.AdamW(groups, lr=recipe.lr0, betas=(recipe.momentum, 0.999))
    for group in optimizer.param_groups:
        group["initial_lr"] = recipe.lr0
    return optimizer


def lr_factor(epoch: int, epochs: int, recipe: Recipe) -> float:
    """Return the learning-rate multiplier of an epoch: linear, or cosine ('one cycle'), from 1 down to lrf."""
    if recipe.cos_lr:
        return ((1 - math.cos(epoch * math.pi / epochs)) / 2) * (recipe.lrf - 1) + 1
    return (1 - epoch / epochs) * (1.0 - recipe.lrf) + recipe.lrf


def warmup_iterations(batches_per_epoch: int, recipe: Recipe) -> int:
    """Return the number of warmup iterations: max(warmup_epochs epochs, warmup_min_iterations)."""
    return max(round(recipe.warmup_epochs * batches_per_epoch), recipe.warmup_min_iterations)


def apply_schedule(optimizer: torch.optim.Optimizer, recipe: Recipe, iteration: int, epoch: int, epochs: int,
                   warmup: int, batch_size: int, world_size: int) -> int:
    """Set every group's learning rate (and momentum) for this iteration; return the accumulation to use now."""
    target = recipe.lr0 * lr_factor(epoch, epochs, recipe)
    full_accumulation = accumulation_steps(batch_size, world_size, recipe.nominal_batch_size)
    if iteration > warmup:
        for group in optimizer.param_groups:
            group["lr"] = target
        return full_accumulation
    xi = [0, warmup]
    for j, group in enumerate(optimizer.param_groups):
        # the bias learning rate falls from warmup_bias_lr, all others rise from 0
        group["lr"] = float(np.interp(iteration, xi, [recipe.warmup_bias_lr if j == 0 else 0.0, target]))
        momentum = float(np.interp(iteration, xi, [recipe.warmup_momentum, recipe.momentum]))
        if "momentum" in group:  # SGD's; YOLOv5 leaves AdamW's beta1 at `momentum` through warmup
            group["momentum"] = momentum
    nominal = recipe.nominal_batch_size / (batch_size * world_size)
    return max(1, round(float(np.interp(iteration, xi, [1, nominal]))))


def ramped_ema(decay: float, tau: float):
    """Return an AveragedModel `multi_avg_fn`: EMA whose decay ramps up as decay * (1 - exp(-updates / tau))."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor) -> None:
        if not averaged[0].is_floating_point():  # BatchNorm's num_batches_tracked counters are not averaged
            return
        d = decay * (1 - math.exp(-(int(num_averaged) + 1) / tau))
        torch._foreach_lerp_(averaged, current, 1 - d)

    return update


class ExponentialMovingAverage(WeightAveraging):
    """YOLOv5's EMA of the weights and BatchNorm statistics, updated after every optimizer step; Lightning's
    WeightAveraging swaps it in for validation and stores it as the checkpoint's `state_dict`."""

    def __init__(self, decay: float = 0.9999, tau: float = 2000.0):
        super().__init__(use_buffers=True, multi_avg_fn=ramped_ema(decay, tau))

    def follow_structure(self, pl_module: pl.LightningModule) -> None:
        """Restart the average from the module's current weights, its decay ramp from the start, when its
        architecture changed: pruned weights are new weights, for which YOLOv5 starts a new EMA (an average that
        went on with the update count of a long run would hold the collapsed weights of the step for thousands of
        updates). A checkpoint's load then restores the count it saved."""
        if self._average_model is None or _same_shapes(self._average_model.module, pl_module):
            return
        self.restart(pl_module)

    def restart(self, pl_module: pl.LightningModule) -> None:
        """Start the average again from the module's current weights and buffers, its decay ramp from the start."""
        self._average_model = AveragedModel(pl_module, use_buffers=True, **self._kwargs)

    def on_fit_start(self, trainer, pl_module) -> None:
        # Lightning builds the average in `setup`, before the strategy moves the module to its GPU: left on the CPU,
        # every optimizer step would copy all weights to the host and average them there.
        super().on_fit_start(trainer, pl_module)
        if self._average_model is not None:
            self._average_model.to(pl_module.device)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        # The module was resized to the checkpoint's (pruned) architecture before this hook; the average follows.
        self.follow_structure(pl_module)
        super().on_load_checkpoint(trainer, pl_module, checkpoint)


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    """Return whether two modules hold tensors of the same names and shapes."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)
