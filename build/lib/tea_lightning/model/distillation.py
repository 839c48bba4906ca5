"""Knowledge distillation from a frozen teacher's outputs, to help a pruned model recover during fine-tuning.

Written here because neither YOLOv5, torch-pruning nor Lightning has it for YOLOv5's head. The loss follows
objectness-weighted output distillation (Mehta and Ozturk, "Object detection at 200 frames per second", 2018), the
form most YOLO distillation uses: the student matches the teacher's objectness in every cell, and its class scores
and box offsets in proportion to how sure the teacher is that the cell holds an object, so that the teacher's
background does not drown its detections.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _bernoulli_divergence(student_logits: Tensor, teacher_probability: Tensor) -> Tensor:
    """Return the elementwise KL divergence of Bernoulli distributions, teacher || student: zero at a match.

    It is binary cross-entropy minus the teacher's entropy, so it has the gradient of BCE with soft targets, and a
    logged value that falls to zero as the student learns the teacher.
    """
    teacher_logits = torch.logit(teacher_probability, eps=1e-6)
    return (F.binary_cross_entropy_with_logits(student_logits, teacher_probability, reduction="none")
            - F.binary_cross_entropy_with_logits(teacher_logits, teacher_probability, reduction="none"))


class OutputDistillation:
    """A frozen teacher YOLOv5 model and the loss that pulls a student's raw head outputs towards the teacher's.

    The teacher is held outside the LightningModule's modules on purpose: it is not trained, not wrapped by DDP, not
    pruned and not written into checkpoints (its path is in the run's hyperparameters).

    Args:
        teacher: a YOLOv5 model with the student's Detect head layout (classes and anchors); its size may differ.
        weight: the distillation loss's weight against YOLOv5's own loss.
    """

    def __init__(self, teacher: nn.Module, weight: float):
        self.teacher = teacher.eval().requires_grad_(False)
        self.weight = weight

    @torch.no_grad()
    def teacher_outputs(self, images: Tensor) -> list[Tensor]:
        """Return the teacher's raw outputs per detection layer, (batch, anchors, ny, nx, 5 + classes) each."""
        return self.teacher(images)[1]  # in eval mode a YOLOv5 model returns (decoded detections, raw outputs)

    def loss(self, images: Tensor, student: Sequence[Tensor], hyp: Mapping[str, float],
             balance: Sequence[float]) -> Tensor:
        """Return the weighted distillation loss for a batch, summed over images like YOLOv5's loss.

        `hyp` and `balance` are YOLOv5's box/obj/cls gains and per-layer objectness balance (ComputeLoss's), so the
        terms keep the proportions of the loss the student trains on anyway.
        """
        teacher = self.teacher_outputs(images)  # the same layout as the student's: Detector checks the heads once
        box = obj = cls = student[0].new_zeros(())
        for t, s, layer_balance in zip(teacher, student, balance):
            t, s = t.float(), s.float()
            objectness = torch.sigmoid(t[..., 4])
            weight_sum = objectness.sum().clamp(min=1e-6)
            obj = obj + _bernoulli_divergence(s[..., 4], objectness).mean() * layer_balance
            cls = cls + (_bernoulli_divergence(s[..., 5:], torch.sigmoid(t[..., 5:])).mean(-1) * objectness).sum() \
                / weight_sum
            # YOLOv5 decodes boxes from the sigmoid of these four outputs: match them there
            box_error = (torch.sigmoid(s[..., :4]) - torch.sigmoid(t[..., :4])).square().mean(-1)
            box = box + (box_error * objectness).sum() / weight_sum
        total = hyp["box"] * box + hyp["obj"] * obj + hyp["cls"] * cls
        return self.weight * total * len(images)
