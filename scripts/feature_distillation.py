"""Experiment (issue 3, docs/benchmarks.md "Distilling the teacher's features on the kept channels"): a `fit` whose
distillation adds, to tea-lightning's output distillation, the teacher's features at the Detect head's inputs
(model.17, 20, 23) on the channels the pruned student kept.

A pruned student's channels are a subset of its teacher's, so no adapter layer is needed: right after the pruning
step, each kept channel is matched to its teacher channel by its BatchNorm weight and bias (unchanged until the first
optimizer step). The term is the mean squared difference of each layer's features divided by the teacher features'
variance, averaged over the three layers, times FEATURE_WEIGHT and the batch size (YOLOv5 sums its loss over images).
Not part of the package: on tea_shoots it did not help (docs/benchmarks.md).

    python scripts/feature_distillation.py 0.2 fit --config configs/yolov5n.yaml --config configs/prune/ratio_03.yaml \
        --data.data_yaml ../shared/data/tea_shoots/data.yaml --model.weights BASE --model.teacher BASE \
        --data.batch_size 8 --trainer.max_epochs 30 --seed_everything 0
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import tea_lightning.model.detector as detector  # noqa: E402
from tea_lightning.cli import main  # noqa: E402
from tea_lightning.model.distillation import OutputDistillation  # noqa: E402

DETECT_INPUTS = (17, 20, 23)  # YOLOv5n/s/m: the C3 blocks that feed the stride 8, 16 and 32 outputs


class KeptChannelDistillation(OutputDistillation):
    """Output distillation plus the teacher's Detect-input features on the channels the student kept."""

    def __init__(self, teacher, weight: float, feature_weight: float, student):
        super().__init__(teacher, weight)
        self.feature_weight, self.student, self.kept = feature_weight, student, None
        self.teacher_features, self.student_features = {}, {}
        for layer in DETECT_INPUTS:
            teacher.model[layer].register_forward_hook(self._keep(self.teacher_features, layer))
            student.model[layer].register_forward_hook(self._keep(self.student_features, layer))

    @staticmethod
    def _keep(features: dict, layer: int):
        return lambda module, inputs, output: features.__setitem__(layer, output)

    def _match_kept_channels(self) -> dict[int, torch.Tensor]:
        kept = {}
        for layer in DETECT_INPUTS:
            ours, theirs = self.student.model[layer].cv3.bn, self.teacher.model[layer].cv3.bn
            s = torch.stack([ours.weight, ours.bias], 1).detach().cpu()
            t = torch.stack([theirs.weight, theirs.bias], 1).detach().cpu()
            match = (s[:, None, :] == t[None]).all(-1)
            if not (match.sum(1) == 1).all():
                raise RuntimeError(f"model.{layer}: the student's channels are not a subset of the teacher's")
            kept[layer] = match.float().argmax(1)
            print(f"feature distillation: model.{layer} keeps {len(s)}/{len(t)} of the teacher's channels")
        return kept

    def loss(self, images, student, hyp, balance):
        total = super().loss(images, student, hyp, balance)  # runs the teacher: its hooks hold its features now
        if self.kept is None:  # the first training batch, after the pruning step and before any optimizer step
            self.kept = self._match_kept_channels()
        feature = 0.0
        for layer in DETECT_INPUTS:
            teacher = self.teacher_features[layer].float()
            teacher = teacher[:, self.kept[layer].to(teacher.device)]
            error = (self.student_features[layer].float() - teacher).square().mean()
            feature = feature + error / teacher.var().clamp(min=1e-6)
        return total + self.feature_weight * feature / len(DETECT_INPUTS) * len(images)


def with_kept_channel_distillation(feature_weight: float):
    """Return a Detector._teacher that builds KeptChannelDistillation instead of the plain output distillation."""
    plain = detector.Detector._teacher

    def _teacher(self, path: str, weight: float):
        output = plain(self, path, weight)
        return KeptChannelDistillation(output.teacher, output.weight, feature_weight, self.model)

    return _teacher


if __name__ == "__main__":
    detector.Detector._teacher = with_kept_channel_distillation(float(sys.argv[1]))
    main(sys.argv[2:])
