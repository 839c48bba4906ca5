"""Experiment (issue 3, docs/benchmarks.md "Fading the channels out before the pruning step"): a `fit` in which the
channels that the pruning step will remove are faded out over the first FADE_EPOCHS epochs instead of being cut at
once, so that the model never collapses and the step itself changes nothing.

At the start of epoch 0 the script asks tea-lightning's own pruner (the ChannelPruning callback's options, Taylor
gradients of the same 64 images) which channels it would remove, on a copy of the model. A forward hook on each
affected BatchNorm multiplies those channels by m, which falls linearly from 1 to 0 over the fade, batch by batch;
the layer's SiLU then gives exactly 0 for them at the end, and their gradients are 0 too. With the callback's
`schedule: [FADE_EPOCHS]`, its Taylor criterion then scores exactly those channels 0 and removes them: the script
checks that the model's outputs are the same before and after the step, and prints the largest difference. The rest
of the fit fine-tunes the pruned model as the shipped recipe does. (Growing regularization, GReg, shrinks such
channels through the optimizer, which YOLOv5's 5 optimizer steps per epoch on tea_shoots leave too few of; a mask
reaches zero on schedule whatever the step count.) Not part of the package.

    python scripts/channel_fading.py 10 fit --config configs/yolov5n.yaml --config configs/prune/ratio_03.yaml \
        --trainer.callbacks.schedule '[10]' --data.data_yaml ../shared/data/tea_shoots/data.yaml \
        --model.weights BASE --model.teacher BASE --data.batch_size 8 --trainer.max_epochs 30 --seed_everything 0
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tea_lightning import ChannelPruning  # noqa: E402
from tea_lightning.cli import main  # noqa: E402
from tea_lightning.model.detector import Detector  # noqa: E402
from tea_lightning.pruning.callback import _loss_gradients  # noqa: E402
from tea_lightning.pruning.pruner import _copy_with_gradients, prune  # noqa: E402


class Fade:
    """The channels to fade per BatchNorm, the current factor m, and the hooks that apply it."""

    def __init__(self, epochs: int):
        self.epochs, self.m, self.active = epochs, 1.0, True
        self.channels: dict[str, torch.Tensor] = {}
        self.sizes: dict[str, int] = {}  # before the step; its MACs count runs the pruned model with the hooks on
        self.handles = []
        self.probe: torch.Tensor | None = None
        self.before: torch.Tensor | None = None

    def plan(self, trainer, module: Detector) -> None:
        """Record, per BatchNorm, the channels that the callback's pruning step would remove now."""
        pruning = next(c for c in trainer.callbacks if isinstance(c, ChannelPruning))
        if pruning.prune_options["importance"] == "taylor":
            _loss_gradients(trainer, module)
        copy = _copy_with_gradients(module.model)
        module.model.zero_grad(set_to_none=True)
        example = torch.zeros(1, 3, module.hparams.img_size, module.hparams.img_size, device=module.device)
        prune(copy, example, pruning.pruning_ratio, **pruning.prune_options)
        pruned = dict(copy.named_modules())
        for name, bn in module.model.named_modules():
            if not isinstance(bn, nn.BatchNorm2d) or pruned[name].num_features == bn.num_features:
                continue
            ours = torch.stack([bn.weight, bn.bias], 1).detach()
            kept = torch.stack([pruned[name].weight, pruned[name].bias], 1).detach()
            is_kept = (ours[:, None, :] == kept[None]).all(-1).any(1)
            if int(is_kept.sum()) != pruned[name].num_features:
                raise RuntimeError(f"{name}: the pruned copy's channels do not match the model's")
            self.channels[name], self.sizes[name] = (~is_kept).nonzero().flatten(), bn.num_features
            self.handles.append(bn.register_forward_hook(self._hook(name)))
        faded = sum(len(c) for c in self.channels.values())
        print(f"channel fading: {faded} channels of {len(self.channels)} BatchNorm layers fade out over "
              f"{self.epochs} epochs")

    def _hook(self, name: str):
        def fade(bn, inputs, output):
            if not self.active or self.m == 1.0 or output.shape[1] != self.sizes[name]:
                return output
            scale = torch.ones(output.shape[1], device=output.device, dtype=output.dtype)
            scale[self.channels[name].to(output.device)] = self.m
            return output * scale.view(1, -1, 1, 1)
        return fade

    def outputs(self, module: Detector) -> torch.Tensor:
        """Return the model's raw outputs on a fixed probe batch, in eval mode."""
        if self.probe is None:
            generator = torch.Generator().manual_seed(0)
            self.probe = torch.rand(2, 3, module.hparams.img_size, module.hparams.img_size, generator=generator)
        training = module.model.training
        module.model.eval()
        with torch.no_grad():
            out = module.model(self.probe.to(module.device))[0].float()
        module.model.train(training)
        return out

    def finish(self, module: Detector) -> None:
        """After the pruning step: stop fading and check that the step changed nothing."""
        self.active = False
        for handle in self.handles:
            handle.remove()
        after = self.outputs(module)
        print(f"channel fading: pruning step changed the outputs by at most "
              f"{(after - self.before).abs().max().item():.3g} (largest output {self.before.abs().max().item():.3g})")


def with_fading(epochs: int) -> None:
    """Give Detector the epoch and batch hooks that plan, apply and end the fade (Detector defines none of them;
    Lightning calls the module's hooks after the callbacks', so the pruning step has run at the fade's end)."""
    fade = Fade(epochs)

    def on_train_epoch_start(self):
        epoch = self.trainer.current_epoch
        if epoch == 0 and not fade.channels:
            fade.plan(self.trainer, self)
        elif epoch == epochs and fade.active:
            fade.finish(self)

    def on_train_batch_start(self, batch, batch_idx):
        if fade.active and self.trainer.current_epoch < epochs:
            done = self.trainer.current_epoch * self.trainer.num_training_batches + batch_idx + 1
            fade.m = max(0.0, 1.0 - done / (epochs * self.trainer.num_training_batches))

    def on_train_epoch_end(self):
        if self.trainer.current_epoch == epochs - 1:
            print(f"channel fading: m = {fade.m:.3g} at the end of epoch {epochs - 1}")
            fade.before = fade.outputs(self)

    Detector.on_train_epoch_start = on_train_epoch_start
    Detector.on_train_batch_start = on_train_batch_start
    Detector.on_train_epoch_end = on_train_epoch_end


if __name__ == "__main__":
    with_fading(int(sys.argv[1]))
    main(sys.argv[2:])
