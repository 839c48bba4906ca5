"""The ChannelPruning callback: structured pruning with torch-pruning at scheduled epochs, training in between."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_info

from tea_lightning.errors import ConfigError
from tea_lightning.model.complexity import macs_to_gflops
from tea_lightning.model.recipe import ExponentialMovingAverage
from tea_lightning.pruning.pruner import Importance, SparsityRegularizer, check_options, ignored_layers, \
    make_importance, output_channels, prune, ratio_for_macs


class ChannelPruning(pl.Callback):
    """Prunes output channels of the YOLOv5 model (torch-pruning's dependency graph) at scheduled epochs.

    With one epoch in `schedule` (usually 0) the model is pruned once and then fine-tuned; with several, each step
    removes part of the target so that the last one reaches it, with training in between. Under `validate`/`test`
    the model is pruned once, to the whole target, before evaluation: how far mAP falls before any fine-tuning.

    Args:
        pruning_ratio: fraction of channels to remove (0 < r < 1); parameters and GFLOPs fall by about 1-(1-r)^2.
        macs_reduction: instead of a channel ratio, the fraction of multiply-accumulates to remove.
        schedule: epochs at whose start a pruning step runs.
        importance: channel importance: l2 (default), l1, taylor, bn_scale, lamp, or random (a control). Taylor
            reads the loss gradients of one nominal batch of training images (64 by default, unaugmented, the same
            on every process); LAMP ranks a layer's channels as L2 does, so it differs from L2 only globally.
        global_pruning: rank channels across layers rather than removing the same share from each layer.
        round_to: keep channel counts multiples of this (8 keeps pruned models fast); None to disable.
        ignored_layers: module names (as in `model.named_modules()` of the YOLOv5 model, e.g. "model.0") left
            alone; the Detect head's output convolutions always are.
        max_layer_ratio: the largest share of any one layer's channels that may go.
        seed: seed of the random criterion (the same on every process).
        sparsity: strength of a sparsity penalty applied in the training before the last pruning step, so that the
            channels to be removed shrink first and the pruned model loses less (0: none; see SparsityRegularizer).
            The penalty acts through the optimizer steps, so it needs epochs before the pruning step, e.g.
            `schedule: [5]`. On tea_shoots (docs/benchmarks.md) 0.005 and 0.05 over 5 epochs cost the unpruned
            YOLOv5n accuracy and did not soften the collapse: tune it on your own data.
    """

    def __init__(self, pruning_ratio: float | None = 0.3, macs_reduction: float | None = None,
                 schedule: list[int] = (0,), importance: Importance = "l2", global_pruning: bool = False,
                 round_to: int | None = 8, ignored_layers: list[str] = (), max_layer_ratio: float = 0.9,
                 seed: int = 0, sparsity: float = 0.0):
        target = macs_reduction if macs_reduction is not None else pruning_ratio
        option = "macs_reduction" if macs_reduction is not None else "pruning_ratio"
        if target is None or not 0 < target < 1:
            raise ConfigError(f"--trainer.callbacks.{option} must be between 0 and 1 (exclusive), got {target}.")
        if not schedule or sorted(set(schedule)) != list(schedule) or min(schedule) < 0:
            raise ConfigError(f"--trainer.callbacks.schedule must list one or more increasing epochs >= 0 (e.g. [0]), "
                              f"got {list(schedule)}.")
        if sparsity < 0:
            raise ConfigError(f"--trainer.callbacks.sparsity must be >= 0, got {sparsity}.")
        if sparsity and schedule[-1] == 0:
            raise ConfigError(f"--trainer.callbacks.sparsity {sparsity} acts in the epochs before the last pruning "
                              "step, and schedule [0] leaves none: prune later (e.g. schedule [5]) or set sparsity 0.")
        # checked here, not at the first pruning step, which may come after hours of training
        check_options(round_to, max_layer_ratio, prefix="--trainer.callbacks.")
        make_importance(importance)
        self.pruning_ratio, self.macs_reduction, self.sparsity = pruning_ratio, macs_reduction, sparsity
        self.schedule = list(schedule)
        self.prune_options = {"importance": importance, "global_pruning": global_pruning, "round_to": round_to,
                              "ignored_names": list(ignored_layers), "max_layer_ratio": max_layer_ratio,
                              "seed": seed}
        self.steps_done = 0
        self.channel_ratio: float | None = None  # resolved from macs_reduction on the unpruned model
        self.original_channels: dict[str, int] | None = None  # before the first of several steps
        self.unpruned_size: tuple[int, int] | None = None  # (parameters, MACs) before the first step
        self._regularizer: SparsityRegularizer | None = None  # built for the current architecture when needed

    # ---- state kept in checkpoints, so that resuming never prunes twice ----------------------------------------
    def state_dict(self) -> dict:
        return {"steps_done": self.steps_done, "channel_ratio": self.channel_ratio,
                "original_channels": self.original_channels, "unpruned_size": self.unpruned_size}

    def load_state_dict(self, state_dict: dict) -> None:
        self.steps_done = state_dict["steps_done"]
        self.channel_ratio = state_dict["channel_ratio"]
        self.original_channels = state_dict.get("original_channels")
        self.unpruned_size = state_dict.get("unpruned_size")  # absent from checkpoints older than it

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        try:
            ignored_layers(pl_module.model, self.prune_options["ignored_names"])
        except ConfigError as err:
            raise ConfigError(f"--trainer.callbacks.ignored_layers: {err}") from None
        if stage == "fit" and 0 <= trainer.max_epochs <= self.schedule[-1]:  # -1: the module refuses it
            raise ConfigError(f"--trainer.callbacks.schedule has epoch {self.schedule[-1]} but training stops after "
                             f"epoch {trainer.max_epochs - 1} (--trainer.max_epochs {trainer.max_epochs}); "
                             "schedule the last pruning step earlier or train longer.")

    # ---- when to prune -----------------------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        due = [e for e in self.schedule if e <= trainer.current_epoch]
        steps = len(self.schedule)
        if steps > 1 and self.steps_done == 0 and due:
            self.original_channels = output_channels(pl_module.model)
        while self.steps_done < len(due):
            # step k of n removes k/n of the target, counted on the original channels
            self._step(trainer, pl_module, share=(self.steps_done + 1) / steps)

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        # Lightning calls this on unscaled gradients, after DDP's all-reduce: every rank adds the same penalty.
        if self.sparsity == 0 or self.steps_done == len(self.schedule):
            return
        if self._regularizer is None:
            self._regularizer = SparsityRegularizer(pl_module.model, self._example(pl_module), self.sparsity,
                                                    self.prune_options["importance"],
                                                    self.prune_options["ignored_names"])
        self._regularizer.regularize()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prune_once_for_evaluation(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._prune_once_for_evaluation(trainer, pl_module)

    def _prune_once_for_evaluation(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn not in ("validate", "test"):
            return
        if self.steps_done == 0:
            self._step(trainer, pl_module, share=1.0, steps=1)
        else:  # the checkpoint's callback state: pruning again would cut a pruned model further
            rank_zero_info(f"Not pruning: the checkpoint was pruned while training ({self.steps_done} step(s) done), "
                           "so it is evaluated as it is; to prune with other settings, start from an unpruned "
                           "checkpoint (--model.weights).")

    # ---- one pruning step --------------------------------------------------------------------------------------
    def _example(self, pl_module: pl.LightningModule) -> torch.Tensor:
        size = pl_module.hparams.img_size
        return torch.zeros(1, 3, size, size, device=pl_module.device)

    def _target(self, pl_module: pl.LightningModule) -> float:
        """Return the total channel ratio: the given one, or the one that removes `macs_reduction` of MACs."""
        if self.macs_reduction is None:
            return self.pruning_ratio
        if self.channel_ratio is None:
            self.channel_ratio = ratio_for_macs(pl_module.model, self._example(pl_module), self.macs_reduction,
                                                **self.prune_options)
        return self.channel_ratio

    def _step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, share: float, steps: int | None = None):
        """Prune to `share` of the total target (a channel ratio of the unpruned model)."""
        steps = steps or len(self.schedule)
        # validate/test run under inference mode, where no autograd graph (the dependency graph's source) exists
        with torch.inference_mode(False), torch.enable_grad():
            if self.prune_options["importance"] == "taylor":
                _loss_gradients(trainer, pl_module)
            # after the gradients: finding the ratio for a macs_reduction prunes trial copies, which Taylor ranks
            # by them
            ratio = self._target(pl_module) * share
            result = prune(pl_module.model, self._example(pl_module), ratio, **self.prune_options,
                           original_channels=self.original_channels if steps > 1 else None)
        pl_module.model.zero_grad(set_to_none=True)
        pl_module.apply_memory_format()  # the pruned layers' new tensors come in the default layout
        if self.steps_done == 0:
            self.unpruned_size = (result.params_before, result.macs_before)
        self.steps_done += 1
        self._regularizer = None  # its dependency graph holds the modules as they were
        # prune() counted MACs on an img_size input, as the model's GFLOPs figure does: no second trace needed
        after = {"model/params": result.params_after, "model/GFLOPs": macs_to_gflops(result.macs_after)}
        when = f"at epoch {trainer.current_epoch}" if trainer.state.fn == "fit" else \
            f"before {trainer.state.fn.value.replace('validate', 'validation')}"
        removed = 1 - result.channels_after / result.channels_before
        capped = ""
        if steps == 1 and ratio - removed > 0.01:  # the layer cap, the rounding or ignored layers kept more
            capped = (f" asked, {removed:.1%} removed (as much as max_layer_ratio "
                      f"{self.prune_options['max_layer_ratio']:g}, round_to {self.prune_options['round_to']} and "
                      "ignored_layers let go)")
        total = ""
        if steps > 1 and self.steps_done == steps and self.unpruned_size:  # the per-step changes do not add up
            params, macs = self.unpruned_size
            total = (f"; in all, parameters {result.params_after / params - 1:+.1%} and GFLOPs "
                     f"{result.macs_after / macs - 1:+.1%} against the unpruned model")
        rank_zero_info(
            f"Pruning step {self.steps_done}/{steps} {when}: "
            f"channels -{ratio:.1%} of the unpruned model's{capped}, "
            f"parameters {result.params_before:,} -> {result.params_after:,} "
            f"({result.params_after / result.params_before - 1:+.1%}), "
            f"GFLOPs {macs_to_gflops(result.macs_before):.3g} -> {after['model/GFLOPs']:.3g} "
            f"({result.macs_after / result.macs_before - 1:+.1%}"
            # one step starts from the unpruned model, so its MACs change is what macs_reduction asked for
            + (f"; macs_reduction asked -{self.macs_reduction:.1%})" if self.macs_reduction and steps == 1 else ")")
            + total)
        for logger in trainer.loggers:
            # with the epoch, so that size can be plotted against it; the run's config follows the pruned size
            logger.log_metrics({**after, "model/pruning_steps": self.steps_done, "epoch": trainer.current_epoch},
                               step=trainer.global_step)
            logger.log_hyperparams({**after, **({"model/unpruned_params": self.unpruned_size[0]}
                                                 if self.unpruned_size else {})})
        if trainer.state.fn == "fit":
            self._rebuild_training_state(trainer, pl_module)
            _restart_best_checkpoint(trainer)

    @staticmethod
    def _rebuild_training_state(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Point the optimizer, the EMA and (under DDP) the wrapper at the new parameters."""
        strategy = trainer.strategy
        if hasattr(strategy, "_setup_model") and strategy.model is not pl_module:
            # DDP holds buckets of the old parameters: wrap the pruned module anew (private Lightning API, pinned
            # by the pytorch-lightning version range and tested in tests/pruning/test_callback.py).
            strategy.model = strategy._setup_model(pl_module)
            strategy._register_ddp_hooks()
        strategy.setup_optimizers(trainer)  # the recipe sets the learning rate per batch, so nothing is lost
        for callback in trainer.callbacks:
            if isinstance(callback, ExponentialMovingAverage):
                callback.follow_structure(pl_module)


def check_resumed_with_pruning(checkpoint: dict, pruning: bool, path: str) -> None:
    """Raise ConfigError when `fit` resumes from `checkpoint` (read from `path`), into which ChannelPruning wrote its
    state, without that callback (`pruning` False).

    The state (steps done, the unpruned channel counts) lives only in the callback's entry of the checkpoint. A fit
    resumed without the callback would skip the steps still scheduled without a word and write checkpoints without
    it; a later resume with the callback would then prune the pruned model again, as if no step had run.
    """
    state = checkpoint.get("callbacks", {}).get(ChannelPruning.__qualname__)
    if state is None or pruning:
        return
    raise ConfigError(
        f"--ckpt_path {path} comes from a fit that pruned with ChannelPruning ({state['steps_done']} step(s) done), "
        "and this fit has no ChannelPruning callback: its checkpoints would lose what was pruned, so that resuming "
        "one with the callback would prune again, and steps still scheduled would not run. Resume with the same "
        "--trainer.callbacks options (the run's config.yaml has them: --config it), or start a new fit from the "
        f"pruned weights with --model.weights {path}.")


def _restart_best_checkpoint(trainer: pl.Trainer) -> None:
    """Make best.ckpt the best model of the architecture trained from now on.

    Right after a pruning step the mAP collapses, so the best score so far belongs to the larger model of an earlier
    stage; left as it is, best.ckpt would stay that unpruned model for the rest of a prune-then-finetune run.
    """
    for checkpoint in trainer.checkpoint_callbacks:
        if getattr(checkpoint, "monitor", None) is None:
            continue
        checkpoint.best_k_models, checkpoint.kth_best_model_path = {}, ""
        checkpoint.best_model_score, checkpoint.best_model_path = None, ""
        checkpoint.kth_value = torch.tensor(-torch.inf if checkpoint.mode == "max" else torch.inf)


def _loss_gradients(trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
    """Leave on the parameters the loss gradients of one nominal batch of training images (64 by default, what one
    optimizer step sees): Taylor importance is |weight x gradient|, and one small batch gives a noisy estimate."""
    model = pl_module.model
    model.zero_grad(set_to_none=True)
    # the loss needs training mode, whose forward would also move the BatchNorm statistics: keep them as they were
    statistics = {name: buffer.clone() for name, buffer in model.named_buffers()}
    was_training = model.training
    model.train()
    for batch in trainer.datamodule.importance_dataloader(pl_module.recipe.nominal_batch_size):
        loss, _ = pl_module.compute_loss(pl_module(batch["images"].to(pl_module.device)),
                                         batch["targets"].to(pl_module.device))
        loss.backward()
    model.train(was_training)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(statistics[name])
