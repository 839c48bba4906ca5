"""tea-lightning: YOLOv5 detectors trained, validated and pruned with PyTorch Lightning."""

from importlib import import_module
from pathlib import Path

# The configs shipped with the package (model recipes, pruning ratios, the demo's); the repository's configs/ is a link
# to this folder, so `--config configs/...` works from a checkout and `demo`/`sweep` find them in any install.
CONFIG_DIR = Path(__file__).resolve().parent / "configs"

# Short names for configs and the command line (`--trainer.callbacks+=tea_lightning.ChannelPruning`), imported on
# first use so that `import tea_lightning` stays light.
_EXPORTS = {
    "ChannelPruning": "tea_lightning.pruning.callback",
    "Detector": "tea_lightning.model.detector",
    "YoloDataModule": "tea_lightning.data.datamodule",
    "DetectionWriter": "tea_lightning.model.writer",
}

__all__ = [*_EXPORTS, "CONFIG_DIR"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'tea_lightning' has no attribute {name!r}")
