"""One structured pruning step of a YOLOv5 model with torch-pruning, and the ratios that schedule such steps."""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch_pruning as tp
from torch import Tensor, nn

from tea_lightning.errors import ConfigError
from tea_lightning.model.complexity import count_parameters
from tea_lightning.pruning.structure import detect_output_convs

Importance = Literal["l2", "l1", "taylor", "bn_scale", "lamp", "random"]

_IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
    "taylor": tp.importance.GroupTaylorImportance,
    "bn_scale": tp.importance.BNScaleImportance,
    "lamp": tp.importance.LAMPImportance,
    "random": tp.importance.RandomImportance,
}


@dataclass(frozen=True)
class PruneResult:
    """Parameters and multiply-accumulates (MACs, on the example inputs) before and after one pruning step."""

    params_before: int
    params_after: int
    macs_before: float
    macs_after: float
    channels_before: int  # the BatchNorm channels: every channel pruning may remove (the Detect head has none)
    channels_after: int


def make_importance(name: str) -> tp.importance.Importance:
    """Return a new torch-pruning importance criterion for `name`, one of `Importance`."""
    if name not in _IMPORTANCES:
        raise ConfigError(f"importance={name!r} is unknown: choose one of {', '.join(_IMPORTANCES)}.")
    return _IMPORTANCES[name]()


def check_options(round_to: int | None, max_layer_ratio: float, prefix: str = "") -> None:
    """Raise ConfigError for an impossible `round_to` or `max_layer_ratio`; `prefix` goes before the option names
    (the callback's "--trainer.callbacks.")."""
    if not 0 < max_layer_ratio < 1:
        raise ConfigError(f"{prefix}max_layer_ratio must be between 0 and 1 (exclusive), got {max_layer_ratio}.")
    if round_to is not None and round_to < 1:
        raise ConfigError(f"{prefix}round_to must be a positive number of channels or None, got {round_to}.")


def ignored_layers(model: nn.Module, names: Sequence[str] = ()) -> list[nn.Module]:
    """Return the modules whose output channels are kept: the Detect head's output convolutions and `names`.

    `names` are qualified names as in `model.named_modules()` ("model.0"); torch-pruning keeps their submodules too.
    """
    modules = dict(model.named_modules())
    unknown = [name for name in names if name not in modules]
    if unknown:
        top = [name for name in modules if name.count(".") == 1] or list(modules)[1:]
        examples = ", ".join([*top[:3], "...", top[-1]] if len(top) > 4 else top)
        raise ConfigError(f"ignored layer {unknown[0]!r} is not a module of the model: give names like {examples}.")
    return [*detect_output_convs(model), *(modules[name] for name in names)]


def output_channels(model: nn.Module) -> dict[str, int]:
    """Return the output channels of every convolution of `model`, by module name."""
    return {name: m.out_channels for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def prune(model: nn.Module, example_inputs: Tensor, ratio: float, importance: str = "l2",
          global_pruning: bool = False, round_to: int | None = 8, ignored_names: Sequence[str] = (),
          max_layer_ratio: float = 0.9, seed: int = 0,
          original_channels: Mapping[str, int] | None = None) -> PruneResult:
    """Return the model's size before and after removing `ratio` of its current channels, in place.

    Local pruning (the default) removes `ratio` of every layer's channels; global pruning ranks all channels
    together. `round_to` rounds each pruned layer's remaining channels to the nearest multiple (for fast kernels), but
    never below `round_to`; no layer loses more than `max_layer_ratio` of its channels. "taylor" needs the gradients of
    a backward pass. The choice of channels depends only on the weights (and gradients for "taylor", `seed` for
    "random"), so every DDP rank prunes the same ones. The mode (train/eval), dtype and frozen parameters of `model`
    are kept.

    For one of several iterative steps, pass `original_channels` (`output_channels(model)` before the first step)
    and the total ratio to have reached after this step: each layer then keeps its original channels x (1 - ratio),
    rounded, so that the steps end where one step would. (Rounding each step's share of the current channels
    instead would leave every 16-channel layer whole in steps under 25%, and those early layers hold most MACs.)
    """
    with _traceable(model):
        params_before, macs_before, channels_before = count_parameters(model), _macs(model, example_inputs), \
            batchnorm_channels(model)
        _prune_once(model, example_inputs, ratio, importance, global_pruning, round_to, ignored_names,
                    max_layer_ratio, seed, original_channels)
        return PruneResult(params_before, count_parameters(model), macs_before, _macs(model, example_inputs),
                           channels_before, batchnorm_channels(model))


def batchnorm_channels(model: nn.Module) -> int:
    """Return the model's BatchNorm channels: every channel pruning may remove (the Detect head has none)."""
    return sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def ratio_for_macs(model: nn.Module, example_inputs: Tensor, macs_reduction: float, tolerance: float = 0.01,
                   max_iterations: int = 8, **prune_kwargs) -> float:
    """Return the `ratio` for which `prune(model, example_inputs, ratio, **prune_kwargs)` removes `macs_reduction`
    of the MACs (within `tolerance`, else the closest ratio tried); `model` itself is not changed."""
    if not 0 < macs_reduction < 1:
        raise ConfigError(f"macs_reduction must be between 0 and 1 (exclusive), got {macs_reduction}.")
    with _traceable(model):
        macs_before = _macs(model, example_inputs)
        low, high = 0.0, 1.0
        ratio = 1 - math.sqrt(1 - macs_reduction)  # MACs fall about with the square of the kept channel fraction
        best = (math.inf, ratio)
        for _ in range(max_iterations):
            pruned = _copy_with_gradients(model)
            _prune_once(pruned, example_inputs, ratio, **prune_kwargs)
            reduction = 1 - _macs(pruned, example_inputs) / macs_before
            best = min(best, (abs(reduction - macs_reduction), ratio))
            if best[0] <= tolerance:
                break
            low, high = (ratio, high) if reduction < macs_reduction else (low, ratio)
            ratio = (low + high) / 2
    return best[1]


class _LayerCappedPruner(tp.pruner.BasePruner):
    """BasePruner that rounds each layer's remaining channels to the nearest multiple of `round_to` and keeps at
    least (1 - max_pruning_ratio) of them, and at least `round_to`, in every step.

    torch-pruning 1.6 rounds down, so even a 5% step drops every 16- or 32-channel layer by 8 channels (-30% MACs
    on YOLOv5n) and a layer rounded down to zero is silently left whole; it applies max_pruning_ratio only to layers
    that an earlier step of the same pruner shrank, and we build a fresh pruner for every step. BasePruner calls
    `_round_to` for every layer it prunes whenever round_to is set, so that is where our rounding goes.
    """

    def _round_to(self, n_pruned: int, current_channels: int, round_to: int) -> int:
        return current_channels - _kept_channels(current_channels - n_pruned, current_channels, round_to,
                                                 self.max_pruning_ratio)


def _kept_channels(asked: int, channels: int, round_to: int, max_layer_ratio: float) -> int:
    """Return how many of a layer's `channels` stay when `asked` should: the nearest multiple of `round_to`, but at
    least (1 - max_layer_ratio) of them rounded up to a multiple (so at least `round_to`), and no more than it has."""
    kept = round_to * math.floor(asked / round_to + 0.5)
    at_least = round_to * math.ceil(round(channels * (1 - max_layer_ratio) / round_to, 6))
    return min(channels, max(kept, at_least))


class SparsityRegularizer:
    """Pushes the channels that a pruning step would remove towards zero while training goes on, so that removing
    them later costs less accuracy (DepGraph's sparse training; network slimming with "bn_scale").

    torch-pruning does the regularization: GroupNormPruner adds `strength` x (up to 16x for the least important
    channels of each group) x the weights to their gradients; for "bn_scale" BNScalePruner adds an L1 penalty on
    the BatchNorm scales. Call `regularize()` after the backward pass, on unscaled gradients, before the optimizer
    step. The dependency graph holds the model's modules: build a new regularizer after every pruning step.
    """

    def __init__(self, model: nn.Module, example_inputs: Tensor, strength: float, importance: str = "l2",
                 ignored_names: Sequence[str] = ()):
        if strength <= 0:
            raise ConfigError(f"sparsity must be > 0 to regularize, got {strength}.")
        self.model = model
        algorithm = tp.pruner.BNScalePruner if importance == "bn_scale" else tp.pruner.GroupNormPruner
        with _traceable(model):
            self._pruner = algorithm(model, example_inputs, make_importance(importance), reg=strength,
                                     ignored_layers=ignored_layers(model, ignored_names))

    def regularize(self) -> None:
        self._pruner.regularize(self.model)


def _layer_ratios(model: nn.Module, ratio: float, original_channels: Mapping[str, int], round_to: int | None,
                  max_layer_ratio: float) -> dict[nn.Module, float]:
    """Return, per convolution, the share of its current channels that leaves it with its original channels x
    (1 - ratio), rounded to the nearest multiple of `round_to` and capped as _LayerCappedPruner caps one step."""
    ratios = {}
    for name, conv in model.named_modules():
        if name not in original_channels or not isinstance(conv, nn.Conv2d):
            continue
        first = original_channels[name]
        # torch-pruning asks for int(channels x (1 - ratio)); one step of _LayerCappedPruner rounds that the same way
        kept = _kept_channels(int(first * (1 - ratio)), first, round_to or 1, max_layer_ratio)
        # torch-pruning keeps int(current x (1 - layer ratio)) channels: the half channel guards against truncation
        ratios[conv] = 1 - (kept + 0.5) / conv.out_channels if kept < conv.out_channels else 0.0
    return ratios


def _prune_once(model: nn.Module, example_inputs: Tensor, ratio: float, importance: str = "l2",
                global_pruning: bool = False, round_to: int | None = 8, ignored_names: Sequence[str] = (),
                max_layer_ratio: float = 0.9, seed: int = 0,
                original_channels: Mapping[str, int] | None = None) -> None:
    _check_ratio(ratio)
    check_options(round_to, max_layer_ratio)
    criterion = make_importance(importance)
    if importance == "taylor" and all(p.grad is None for p in model.parameters()):
        raise ConfigError("importance='taylor' needs gradients: run a forward and backward pass on a training batch "
                         "before pruning (the pruning callback does this itself).")
    layer_ratios = None
    if original_channels is not None:
        if global_pruning:  # one ranking over all layers: the step removes what is left of the total
            current = output_channels(model)
            ratio = 1 - (1 - ratio) * sum(original_channels.values()) / sum(current[n] for n in original_channels)
            _check_ratio(ratio)
        else:
            layer_ratios = _layer_ratios(model, ratio, original_channels, round_to, max_layer_ratio)
    with _traceable(model):
        pruner = _LayerCappedPruner(model, example_inputs, criterion, global_pruning=global_pruning,
                                    pruning_ratio=ratio, pruning_ratio_dict=layer_ratios,
                                    max_pruning_ratio=max_layer_ratio,
                                    round_to=round_to or 1,  # 1 rounds nothing but routes every layer through the cap
                                    ignored_layers=ignored_layers(model, ignored_names))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)  # only "random" draws numbers: same seed, same channels
            pruner.step()


def _copy_with_gradients(model: nn.Module) -> nn.Module:
    """Return a deep copy of `model` that also holds its gradients (deepcopy drops them; Taylor needs them)."""
    clone = copy.deepcopy(model)
    for source, target in zip(model.parameters(), clone.parameters()):
        target.grad = None if source.grad is None else source.grad.clone()
    return clone


def _check_ratio(ratio: float) -> None:
    if not 0 < ratio < 1:
        raise ConfigError(f"pruning_ratio must be between 0 and 1 (exclusive), got {ratio}.")


@contextlib.contextmanager
def _traceable(model: nn.Module) -> Iterator[None]:
    """Let torch-pruning trace `model` through autograd, then give back its mode, dtype and frozen parameters.

    Official YOLOv5 checkpoints hold frozen float16 weights, in which autograd finds no graph; a forward pass in
    training mode would update the BatchNorm statistics; the caller may be inside torch.no_grad().
    """
    training, dtype = model.training, next(model.parameters()).dtype
    frozen = {name for name, parameter in model.named_parameters() if not parameter.requires_grad}
    model.float().eval().requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        model.to(dtype).train(training)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(name not in frozen)


@torch.no_grad()
def _macs(model: nn.Module, example_inputs: Tensor) -> float:
    return float(tp.utils.count_ops_and_params(model, example_inputs)[0])
