"""Build YOLOv5 models from their yaml and transfer weights from official YOLOv5 `.pt` checkpoints."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from tea_lightning.errors import UserError
from tea_lightning.pruning.structure import resize_to_state_dict

log = logging.getLogger(__name__)

# The yolov5 package would otherwise ask GitHub for updates and download a font on first plot.
os.environ.setdefault("YOLOv5_AUTOINSTALL", "false")
os.environ.setdefault("YOLOv5_VERBOSE", "false")

import yolov5.utils.torch_utils  # noqa: E402,F401

# Importing yolov5.utils.torch_utils hides every UserWarning of the process (filterwarnings('ignore',
# category=UserWarning)), Lightning's and ours included: show them again, once per place as Python does by default.
warnings.filterwarnings("default", category=UserWarning)


class ModelConfigError(UserError, ValueError):
    """A model yaml or weights file that cannot be used; the message says which and what to do."""


def yolov5_package_dir() -> Path:
    """Return the folder of the installed `yolov5` package."""
    import yolov5

    return Path(yolov5.__file__).parent


def resolve_model_yaml(name: str, option: str = "--model.model_cfg") -> Path:
    """Return the path of a model yaml: an existing file, or one of the yolov5 package's (yolov5n.yaml, ...);
    `option` is where the name came from, for the error."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    packaged = yolov5_package_dir() / "models" / path.name
    if packaged.is_file():
        return packaged
    available = sorted(p.name for p in (yolov5_package_dir() / "models").glob("yolov5*.yaml"))
    raise ModelConfigError(f"{option} {name}: no such file, nor a yolov5 model yaml. "
                           f"Give a path to a YOLOv5 model yaml or one of: {', '.join(available)}.")


@contextlib.contextmanager
def quiet_yolov5():
    """Silence the yolov5 package's layer tables and summaries (model building, fusing)."""
    logger = logging.getLogger("yolov5")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def build_model(model_cfg: str, nc: int, option: str = "--model.model_cfg") -> nn.Module:
    """Return a freshly initialised `yolov5.models.yolo.Model` with `nc` classes."""
    from yolov5.models.yolo import Model

    with quiet_yolov5():
        return Model(str(resolve_model_yaml(model_cfg, option)), ch=3, nc=nc)


def set_layer_memory_format(model: nn.Module, memory_format: torch.memory_format) -> None:
    """Put a YOLOv5 model's layers (`model.model`) in `memory_format`. The layers, not the model: YOLOv5's
    `_apply` also converts the Detect head's cached 5-D grids, which have no channels-last layout."""
    model.model.to(memory_format=memory_format)


def inference_model(model: nn.Module) -> nn.Module:
    """Return an eval-mode float32 copy of a YOLOv5 model as it is deployed: each BatchNorm folded into the
    convolution before it (YOLOv5's `fuse`, as its detect.py and export.py do), the layers in the memory layout they
    had, and a Detect head that returns only the (B, N, 5 + nc) predictions."""
    channels_last = next(model.parameters()).is_contiguous(memory_format=torch.channels_last)
    model = copy.deepcopy(model).float().eval()
    set_layer_memory_format(model, torch.contiguous_format)  # YOLOv5's folding views weights as (out, in*k*k)
    # without no_grad the fused weights are copied from weights that require gradients: they would keep an
    # autograd graph back to the training weights (non-leaf parameters, which every later .to() warns about)
    with quiet_yolov5(), torch.no_grad():
        model.fuse()
    if channels_last:
        set_layer_memory_format(model, torch.channels_last)
    model.model[-1].export = True  # YOLOv5's switch: skip the per-level raw outputs
    return model


ANY_WEIGHTS = "a YOLOv5 .pt file or a tea-lightning .ckpt"
TEA_CHECKPOINT = "a tea-lightning .ckpt (fit writes best.ckpt and last.ckpt in its run folder's checkpoints/)"


def _load(path: str | Path, option: str, wanted: str = ANY_WEIGHTS):
    """Return the unpickled contents of a weights file, or raise an error that names the file, the option and
    `wanted`, what the option takes."""
    path = Path(path).expanduser()
    if path.is_dir():
        inside = sorted(p.name for p in path.iterdir() if p.suffix in (".ckpt", ".pt"))
        raise ModelConfigError(f"{option} {path} is a folder: give the path of {wanted}"
                               + (f" ({', '.join(inside)} there)." if inside else "."))
    if not path.is_file():
        raise ModelConfigError(f"{option} {path} does not exist: give the path of {wanted}.")
    import yolov5.models.yolo  # noqa: F401  puts the package's `models` on sys.path so the pickle resolves

    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file raises one of many types
        kind = "" if path.suffix in (".ckpt", ".pt", ".pth") else \
            f" (a {path.suffix or 'suffix-less'} file is not a PyTorch checkpoint: give {wanted})"
        raise ModelConfigError(f"{option} {path} could not be read as a checkpoint{kind}: {err}") from err


def _pickled_model(checkpoint, path: str | Path, option: str) -> nn.Module:
    """Return the model of a YOLOv5 `.pt`: its EMA if present, else its model."""
    model = checkpoint.get("ema") or checkpoint.get("model") if isinstance(checkpoint, dict) else checkpoint
    if not isinstance(model, nn.Module):
        raise ModelConfigError(f"{option} {path} holds neither a YOLOv5 model nor a Lightning state_dict.")
    return model


def _is_lightning_checkpoint(checkpoint) -> bool:
    return isinstance(checkpoint, dict) and "state_dict" in checkpoint


def _tea_hyperparameters(checkpoint, path: str | Path, option: str) -> dict:
    """Return a tea-lightning checkpoint's hyperparameters, or raise if `checkpoint` is not one."""
    hparams = checkpoint.get("hyper_parameters", {}) if _is_lightning_checkpoint(checkpoint) else {}
    if "model_cfg" not in hparams or "nc" not in hparams:
        raise ModelConfigError(f"{option} {path} is not a checkpoint written by tea-lightning fit (a Lightning .ckpt "
                               "with tea-lightning's model_cfg and nc hyperparameters); official YOLOv5 .pt weights "
                               "go to --model.weights.")
    return hparams


def check_tea_checkpoint(path: str | Path, option: str) -> dict:
    """Return the checkpoint at `path`; raise an error that names the file and the option unless it is a
    tea-lightning .ckpt."""
    checkpoint = _load(path, option, TEA_CHECKPOINT)
    _tea_hyperparameters(checkpoint, path, option)
    return checkpoint


def _model_weights(checkpoint) -> dict[str, torch.Tensor]:
    """Return the YOLOv5 model's float32 tensors from one of our Lightning checkpoints (its EMA weights)."""
    prefix = "model."
    return {k[len(prefix):]: v.float() for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], bool]:
    """Return the float32 weights of an official YOLOv5 `.pt` (its EMA if present, else its model) or of a
    tea-lightning `.ckpt` (its EMA weights), and whether they came from a tea-lightning checkpoint.

    YOLOv5 `.pt` files are pickled model objects: loading them runs code from the file (weights_only=False), so
    only files from a source you trust should be given.
    """
    option = "--model.weights"
    checkpoint = _load(path, option)
    if _is_lightning_checkpoint(checkpoint):
        return _model_weights(checkpoint), True
    return {k: v.float() for k, v in _pickled_model(checkpoint, path, option).state_dict().items()}, False


def read_model(path: str | Path, option: str) -> nn.Module:
    """Return the whole float32 model of a YOLOv5 `.pt` or of a tea-lightning `.ckpt`, pruned or not, with the
    architecture it was saved with (from the checkpoint's model yaml and class count for a `.ckpt`)."""
    return read_model_and_img_size(path, option)[0]


def read_model_and_img_size(path: str | Path, option: str) -> tuple[nn.Module, int]:
    """Return `read_model`'s model and the image size it was trained at: a `.ckpt`'s, or YOLOv5's default 640 for a
    YOLOv5 `.pt` (which records none), from one read of the file."""
    checkpoint = _load(path, option)
    if not _is_lightning_checkpoint(checkpoint):
        return _pickled_model(checkpoint, path, option).float(), 640
    return model_of_checkpoint(checkpoint, path, option), checkpoint["hyper_parameters"]["img_size"]


def model_of_checkpoint(checkpoint: dict, path: str | Path, option: str) -> nn.Module:
    """Return the float32 model (its EMA weights) of a loaded tea-lightning checkpoint, with the architecture it
    was saved with, pruned or not."""
    hparams = _tea_hyperparameters(checkpoint, path, option)
    model = build_model(hparams["model_cfg"], hparams["nc"], f"the model yaml {option} {path} was trained with,")
    state = _model_weights(checkpoint)
    resize_to_state_dict(model, state, source=f"{option} {path}")
    model.load_state_dict(state)
    return model


def transfer_weights(model: nn.Module, source: dict[str, torch.Tensor]) -> tuple[int, int]:
    """Copy every tensor whose name and shape match into `model`; return (transferred, total) counts."""
    target = model.state_dict()
    matching = {k: v for k, v in source.items() if k in target and v.shape == target[k].shape}
    model.load_state_dict(matching, strict=False)
    return len(matching), len(target)


def save_yolov5_checkpoint(model: nn.Module, names: list[str], path: str | Path) -> Path:
    """Write the model as YOLOv5's train.py does (a pickled fp16 model under 'model'), so that YOLOv5's own
    detect.py, val.py and export.py load it; return the path."""
    from copy import deepcopy

    model = deepcopy(model).half().eval()
    model.names, model.nc = names, len(names)  # attributes YOLOv5's train.py attaches and val.py reads
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "ema": None, "epoch": -1, "optimizer": None, "best_fitness": None}, path)
    return path
