"""YOLOv5's AMP check as a callback: if mixed precision changes the model's output on a real image, use FP32."""

from __future__ import annotations

import torch
from pytorch_lightning import Callback
from pytorch_lightning.plugins.precision import MixedPrecision, Precision
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn

# Largest difference between the mixed-precision and the FP32 output, relative to the output's scale, that still
# counts as the same result. Healthy fp16/bf16 kernels differ by well under 1 %; broken ones (the GPUs YOLOv5's
# check_amp guards against) give NaN, zeros or garbage.
TOLERANCE = 0.05


def output_difference(model: torch.nn.Module, images: torch.Tensor, autocast) -> float:
    """Return max |mixed - fp32| / max(1, max |fp32|) of the model's inference output (inf when not finite)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        reference = model(images)[0].float()
        with autocast:
            mixed = model(images)[0].float()
    model.train(was_training)
    if not torch.isfinite(mixed).all():
        return float("inf")
    return float((mixed - reference).abs().max() / reference.abs().max().clamp(min=1))


class AmpCheck(Callback):
    """Before a mixed-precision run, compares the model's output on the first validation image with and without
    autocast (YOLOv5's check_amp, on the data at hand instead of a downloaded image); if they differ, warns and
    switches the run to FP32. Every process takes rank 0's decision."""

    def __init__(self) -> None:
        self.checked = False

    def _check(self, trainer, pl_module) -> None:
        plugin = trainer.strategy.precision_plugin
        if self.checked or not isinstance(plugin, MixedPrecision) or trainer.datamodule is None:
            return
        self.checked = True
        sample = trainer.datamodule.val_dataloader().dataset[0]
        images = sample.image[None].to(pl_module.device).float() / 255
        difference = output_difference(pl_module.model, images, plugin.autocast_context_manager())
        agrees = trainer.strategy.broadcast(difference <= TOLERANCE, src=0)
        if agrees:
            rank_zero_info(f"AMP check passed: {plugin.precision} output within {difference:.1e} of FP32.")
            return
        rank_zero_warn(f"AMP check failed: with --trainer.precision {plugin.precision} the model's output on "
                       f"{sample.path} differs from FP32 by {difference:.3g} (relative; more than {TOLERANCE}), so "
                       "this device's mixed precision is not trusted and the run continues in FP32 (32-true). "
                       "Set --trainer.precision 32-true to skip the check.")
        trainer.strategy.precision_plugin = Precision()

    def on_fit_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)

    def on_test_start(self, trainer, pl_module) -> None:
        self._check(trainer, pl_module)
