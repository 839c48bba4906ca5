"""The pruned architecture of a checkpoint: resize a freshly built YOLOv5 model so that its state dict loads."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from tea_lightning.errors import UserError

_RETRAIN_HINT = ("this checkpoint was made from another model yaml or class count: use the model config and nc "
                 "it was trained with")


class StructureMismatch(UserError, ValueError):
    """A state dict that no pruning of the model could have produced; the message names the key and what to do."""


def detect_output_convs(model: nn.Module) -> list[nn.Conv2d]:
    """Return the output convolutions of every YOLOv5 `Detect` head in `model` (na*(nc+5) channels each).

    Heads are recognised by what they hold, not by their class: an official YOLOv5 .pt unpickles its head as
    `models.yolo.Detect`, another class than the yolov5 package's `yolov5.models.yolo.Detect`, and pruning its
    outputs would break the model."""
    return [conv for module in model.modules() if isinstance(getattr(module, "m", None), nn.ModuleList)
            and hasattr(module, "na") and hasattr(module, "no") for conv in module.m]


def with_classes_of(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Return `state_dict` with the output convolutions of `model`'s Detect heads shaped for `model`'s class count
    (keeping their stored, possibly pruned, input channels; the values are placeholders), so that
    `resize_to_state_dict` takes a checkpoint's architecture for a data set with other classes. Loading follows
    with the original state dict, whose head then does not fit and is left freshly initialised."""
    names = {id(module): name for name, module in model.named_modules()}
    adapted = dict(state_dict)
    for conv in detect_output_convs(model):
        key = f"{prefix}{names[id(conv)]}."
        stored = state_dict.get(key + "weight")
        if stored is None or stored.shape[0] == conv.out_channels:
            continue
        adapted[key + "weight"] = torch.empty(conv.out_channels, *stored.shape[1:])
        if key + "bias" in state_dict:
            adapted[key + "bias"] = torch.empty(conv.out_channels)
    return adapted


def resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str = "",
                         source: str = "") -> int:
    """Return how many Conv2d/BatchNorm2d modules of `model` were shrunk to the shapes stored in `state_dict`.

    Only the keys that start with `prefix` are read (e.g. "model." for a LightningModule holding the YOLOv5 model as
    `self.model`). The new tensors hold no meaningful values: `load_state_dict` is expected to follow. Everything is
    checked before anything changes, so a StructureMismatch leaves the model as it was. `source` (the option and
    file the state dict came from, e.g. "--model.weights best.ckpt") starts the error message.
    """
    try:
        return _resize_to_state_dict(model, state_dict, prefix)
    except StructureMismatch as err:
        if not source:
            raise
        raise StructureMismatch(f"{source}: {err}") from None


def _resize_to_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], prefix: str) -> int:
    stored = {key[len(prefix):]: tensor for key, tensor in state_dict.items() if key.startswith(prefix)}
    current = model.state_dict()
    _check_same_keys(current, stored, prefix)
    modules = dict(model.named_modules())
    output_anchors = _output_anchors(model)
    plan: dict[str, nn.Module] = {}
    for key, tensor in current.items():
        if tensor.shape != stored[key].shape:
            owner = key.rpartition(".")[0]
            _check_resizable(modules[owner], output_anchors.get(id(modules[owner])), prefix + key, tensor,
                             stored[key])
            plan[owner] = modules[owner]
    for owner, module in plan.items():
        _resize(module, {name: stored[f"{owner}.{name}"] for name in module.state_dict()})
    return len(plan)


def _shape(tensor: Tensor) -> str:
    return str(tuple(tensor.shape))


def _check_same_keys(current: Mapping[str, Tensor], stored: Mapping[str, Tensor], prefix: str) -> None:
    missing = [key for key in current if key not in stored]
    if missing:
        raise StructureMismatch(f"{prefix}{missing[0]} (shape {_shape(current[missing[0]])} in the model) is missing "
                                f"from the checkpoint ({len(missing)} missing in all): {_RETRAIN_HINT}.")
    unexpected = [key for key in stored if key not in current]
    if unexpected:
        raise StructureMismatch(f"{prefix}{unexpected[0]} (shape {_shape(stored[unexpected[0]])} in the checkpoint) "
                                f"is not in the model ({len(unexpected)} unexpected in all): {_RETRAIN_HINT}.")


def _output_anchors(model: nn.Module) -> dict[int, int]:
    """Return the anchors per position (na) of every Detect output convolution of `model`, by the conv's id."""
    from yolov5.models.yolo import Detect

    return {id(conv): module.na for module in model.modules() if isinstance(module, Detect) for conv in module.m}


def _check_resizable(module: nn.Module, anchors: int | None, key: str, current: Tensor, stored: Tensor) -> None:
    """Raise StructureMismatch unless pruning could have turned `current` into `stored`; `anchors` is na for a Detect
    output convolution (whose na*(nc+5) channels are never pruned), else None."""
    shapes = f"{key}: the model has {_shape(current)}, the checkpoint {_shape(stored)}"
    if current.ndim != stored.ndim:
        raise StructureMismatch(f"{shapes} (different numbers of dimensions): {_RETRAIN_HINT}.")
    if not isinstance(module, (nn.Conv2d, nn.BatchNorm2d)):
        raise StructureMismatch(f"{shapes}, but only Conv2d and BatchNorm2d layers are pruned, not "
                                f"{type(module).__name__}: {_RETRAIN_HINT}.")
    if anchors and stored.shape[0] != current.shape[0]:
        raise StructureMismatch(f"{shapes}: the checkpoint detects {stored.shape[0] // anchors - 5} classes, this "
                                f"model {current.shape[0] // anchors - 5} (the data set's). Evaluate or resume it on "
                                "the data set it was trained with; to fine-tune it on this one, give it as "
                                "--model.weights (every layer but the detection head is transferred).")
    # Pruning only removes channels: a larger stored tensor comes from a wider model.
    if any(s > c for s, c in zip(stored.shape, current.shape)):
        raise StructureMismatch(f"{shapes}, which is larger, so it was not pruned from this model: {_RETRAIN_HINT}.")
    if isinstance(module, nn.Conv2d):
        _check_conv(module, shapes, stored)


def _check_conv(conv: nn.Conv2d, shapes: str, stored: Tensor) -> None:
    if stored.ndim == 4 and stored.shape[2:] != conv.weight.shape[2:]:
        raise StructureMismatch(f"{shapes}: pruning keeps kernel sizes, {_RETRAIN_HINT}.")
    if conv.groups > 1 and not _is_depthwise(conv):
        raise StructureMismatch(f"{shapes}: resizing a grouped ({conv.groups} groups) convolution is not supported.")
    if _is_depthwise(conv) and stored.ndim == 4 and stored.shape[1] != 1:
        raise StructureMismatch(f"{shapes}: a depthwise convolution keeps one input channel per group, "
                                f"{_RETRAIN_HINT}.")


def _is_depthwise(conv: nn.Conv2d) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _resize(module: nn.Module, stored: Mapping[str, Tensor]) -> None:
    """Give each of `module`'s tensors its stored shape, then update the channel counts that describe them."""
    depthwise = isinstance(module, nn.Conv2d) and _is_depthwise(module)
    for name, tensor in stored.items():
        old = getattr(module, name)
        if old.shape == tensor.shape:
            continue
        new = torch.empty(tensor.shape, dtype=old.dtype, device=old.device)
        setattr(module, name, nn.Parameter(new, old.requires_grad) if isinstance(old, nn.Parameter) else new)
    if isinstance(module, nn.BatchNorm2d):
        module.num_features = stored["running_mean" if "running_mean" in stored else "weight"].shape[0]
        return
    module.out_channels = module.weight.shape[0]
    module.in_channels = module.out_channels if depthwise else module.weight.shape[1]
    if depthwise:
        module.groups = module.out_channels
