"""Lightning's model summary of the Detector reports the model's real FLOPs, not 0."""

import pytest
import torch
from pytorch_lightning.utilities.model_summary import ModelSummary

from tea_lightning.model.detector import Detector
from tea_lightning.pruning.pruner import prune


@pytest.mark.parametrize("pruning_ratio", [None, 0.5])
def test_summary_flops_match_our_gflops_at_the_training_size(pruning_ratio):
    detector = Detector(nc=4, img_size=160)
    if pruning_ratio:
        prune(detector.model, torch.zeros(1, 3, 160, 160), pruning_ratio)
    ours = detector.model_summary()["model/GFLOPs"]
    # torch's FlopCounterMode counts convolutions and matrix products only (no activations or additions)
    assert ModelSummary(detector, max_depth=1).total_flops / 1e9 == pytest.approx(ours, rel=0.03)
