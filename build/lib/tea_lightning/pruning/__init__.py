"""Structured channel pruning of YOLOv5 models with torch-pruning, and reloading pruned checkpoints."""

from tea_lightning.pruning.callback import ChannelPruning
from tea_lightning.pruning.pruner import PruneResult, make_importance, output_channels, prune, ratio_for_macs
from tea_lightning.pruning.structure import StructureMismatch, resize_to_state_dict

__all__ = ["ChannelPruning", "PruneResult", "StructureMismatch", "make_importance", "output_channels", "prune",
           "ratio_for_macs", "resize_to_state_dict"]
