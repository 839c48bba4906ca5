"""Detection validation metrics that reproduce the numbers printed by YOLOv5's ``val.py``.

``ConfidenceCurves`` re-implements YOLOv5's per-prediction matching and its precision/recall/F1
curves and AP; ``DetectionMetrics`` pairs it with torchmetrics' COCO mAP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.detection import MeanAveragePrecision
from torchmetrics.utilities import dim_zero_cat
from torchvision.ops import box_iou

__all__ = ["ConfidenceCurves", "CurveResult", "DetectionMetrics", "compute_curves", "match_predictions"]

NUM_CURVE_POINTS = 1000
# Keeps F1 at 0 instead of NaN where precision and recall are both 0.
_EPS = 1e-16


def _iou_thresholds(device: torch.device | None = None) -> Tensor:
    """Return the ten IoU thresholds 0.50:0.05:0.95 as float32, the dtype YOLOv5 compares in."""
    return torch.linspace(0.5, 0.95, 10, device=device)


@dataclass
class CurveResult:
    """YOLOv5-style per-class curves, AP and the operating point of maximum mean F1.

    Only classes that have at least one target appear (row ``k`` belongs to ``classes[k]``).
    Not frozen: torchmetrics rebuilds returned dataclasses field by field.
    """

    classes: np.ndarray  # (C,) int64, ascending
    px: np.ndarray  # (1000,) confidence grid; also the recall grid of ``pr_curve``
    precision_curve: np.ndarray  # (C, 1000) precision vs confidence
    recall_curve: np.ndarray  # (C, 1000) recall vs confidence
    f1_curve: np.ndarray  # (C, 1000) F1 vs confidence
    pr_curve: np.ndarray  # (C, 1000) precision envelope vs recall at IoU 0.5
    ap: np.ndarray  # (C, 10) AP at IoU 0.50:0.05:0.95
    best_index: int  # index into ``px`` of the chosen confidence
    conf: float  # px[best_index]
    class_precision: np.ndarray  # (C,) at ``conf``
    class_recall: np.ndarray  # (C,) at ``conf``
    class_f1: np.ndarray  # (C,) at ``conf``
    tp: np.ndarray  # (C,) int64, IoU-0.5 true positives among predictions with score >= conf
    fp: np.ndarray  # (C,) int64, false positives among predictions with score >= conf
    precision: float  # class mean of ``class_precision``
    recall: float
    f1: float

    @property
    def ap50(self) -> np.ndarray:
        """Return the per-class AP at IoU 0.5, shape (C,)."""
        return self.ap[:, 0]

    @property
    def map50(self) -> float:
        """Return the class-mean AP at IoU 0.5 (0.0 without classes)."""
        return float(self.ap[:, 0].mean()) if len(self.classes) else 0.0

    @property
    def map(self) -> float:
        """Return the class-mean AP averaged over IoU 0.50:0.95 (0.0 without classes)."""
        return float(self.ap.mean()) if len(self.classes) else 0.0

    def state_dict(self) -> dict[str, Tensor | int | float]:
        """Return the fields as tensors and numbers, which a checkpoint loads with torch's weights_only=True."""
        return {f.name: torch.from_numpy(v) if isinstance(v := getattr(self, f.name), np.ndarray) else v
                for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor | int | float]) -> CurveResult:
        return cls(**{name: v.numpy() if isinstance(v, Tensor) else v for name, v in state.items()})


def match_predictions(
    pred_boxes: Tensor,
    pred_scores: Tensor,
    pred_labels: Tensor,
    target_boxes: Tensor,
    target_labels: Tensor,
    iou_thresholds: Tensor,
) -> Tensor:
    """Return an (N, len(iou_thresholds)) bool tensor marking each prediction a true positive.

    Same result as YOLOv5 val.py: every prediction proposes its highest-IoU target of the same class;
    a target proposed by several predictions goes to the highest-scoring one (val.py sees predictions
    sorted by score, so its "first detection index" is this) and the others stay false positives even
    if they overlap another free target.
    """
    num_preds, num_targets = pred_boxes.shape[0], target_boxes.shape[0]
    num_thr = iou_thresholds.shape[0]
    if num_preds == 0 or num_targets == 0:
        return torch.zeros(num_preds, num_thr, dtype=torch.bool, device=pred_boxes.device)

    iou = box_iou(target_boxes.float(), pred_boxes.float())
    # IoU is >= 0 and thresholds are >= 0.5, so -1 can never pass a threshold.
    iou = iou.masked_fill(target_labels[:, None] != pred_labels[None, :], -1.0)
    best_iou, best_target = iou.max(dim=0)

    order = torch.argsort(pred_scores, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(num_preds, device=order.device)

    valid = best_iou[None, :] >= iou_thresholds[:, None]  # (T, N)
    proposer_rank = torch.where(valid, rank[None, :], num_preds)
    target_index = best_target[None, :].expand(num_thr, num_preds)
    winner_rank = torch.full((num_thr, num_targets), num_preds, dtype=rank.dtype, device=rank.device)
    winner_rank = winner_rank.scatter_reduce(1, target_index, proposer_rank, reduce="amin")
    won = winner_rank.gather(1, target_index) == rank[None, :]
    return (valid & won).T


def _smooth(y: np.ndarray, fraction: float) -> np.ndarray:
    """Return ``y`` filtered by a centred box filter spanning ``fraction`` of its length (edge-padded)."""
    width = round(len(y) * fraction * 2) // 2 + 1
    half = width // 2
    padded = np.concatenate((np.full(half, y[0]), y, np.full(half, y[-1])))
    return np.convolve(padded, np.ones(width) / width, mode="valid")


def _precision_envelope(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return (recall, precision) with sentinels added and precision made non-increasing in recall."""
    mrec = np.concatenate(([0.0], recall, [1.0]))
    mpre = np.concatenate(([1.0], precision, [0.0]))
    return mrec, np.maximum.accumulate(mpre[::-1])[::-1]


def _average_precision(recall: np.ndarray, precision: np.ndarray) -> float:
    """Return the trapezoid integral of the precision envelope sampled at 101 recall points."""
    mrec, mpre = _precision_envelope(recall, precision)
    x = np.linspace(0.0, 1.0, 101)
    return float(np.trapezoid(np.interp(x, mrec, mpre), x))


def compute_curves(
    scores: np.ndarray, pred_labels: np.ndarray, correct: np.ndarray, target_labels: np.ndarray
) -> CurveResult:
    """Return the YOLOv5 ``ap_per_class`` statistics of the gathered predictions as a ``CurveResult``."""
    order = np.argsort(-scores, kind="stable")
    scores, pred_labels, correct = scores[order], pred_labels[order], correct[order]
    classes, counts = np.unique(target_labels, return_counts=True)
    num_classes, num_thr = len(classes), correct.shape[1]
    px = np.linspace(0.0, 1.0, NUM_CURVE_POINTS)

    precision_curve = np.zeros((num_classes, NUM_CURVE_POINTS))
    recall_curve = np.zeros((num_classes, NUM_CURVE_POINTS))
    pr_curve = np.zeros((num_classes, NUM_CURVE_POINTS))
    ap = np.zeros((num_classes, num_thr))
    for k, (cls, num_targets) in enumerate(zip(classes, counts)):
        mine = pred_labels == cls
        if not mine.any():
            continue
        hits = correct[mine].astype(np.float64)
        tpc = hits.cumsum(0)
        fpc = (1.0 - hits).cumsum(0)
        recall = tpc / num_targets
        precision = tpc / (tpc + fpc)
        # np.interp needs increasing sample points and scores are descending, hence the negation.
        neg_scores = -scores[mine]
        recall_curve[k] = np.interp(-px, neg_scores, recall[:, 0], left=0.0)
        precision_curve[k] = np.interp(-px, neg_scores, precision[:, 0], left=1.0)
        ap[k] = [_average_precision(recall[:, t], precision[:, t]) for t in range(num_thr)]
        pr_curve[k] = np.interp(px, *_precision_envelope(recall[:, 0], precision[:, 0]))

    f1_curve = 2 * precision_curve * recall_curve / (precision_curve + recall_curve + _EPS)
    best = int(_smooth(f1_curve.mean(0), 0.1).argmax()) if num_classes else 0
    conf = float(px[best])

    kept = scores >= conf
    tp = np.array([(correct[kept & (pred_labels == c), 0]).sum() for c in classes], dtype=np.int64)
    fp = np.array([(~correct[kept & (pred_labels == c), 0]).sum() for c in classes], dtype=np.int64)
    class_p, class_r, class_f1 = precision_curve[:, best], recall_curve[:, best], f1_curve[:, best]

    def mean(x: np.ndarray) -> float:
        return float(x.mean()) if num_classes else 0.0

    return CurveResult(
        classes=classes.astype(np.int64),
        px=px,
        precision_curve=precision_curve,
        recall_curve=recall_curve,
        f1_curve=f1_curve,
        pr_curve=pr_curve,
        ap=ap,
        best_index=best,
        conf=conf,
        class_precision=class_p,
        class_recall=class_r,
        class_f1=class_f1,
        tp=tp,
        fp=fp,
        precision=mean(class_p),
        recall=mean(class_r),
        f1=mean(class_f1),
    )


def _cat(state: list[Tensor] | Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """Return the concatenated list state on CPU, or an empty tensor of ``shape`` if nothing was gathered."""
    if isinstance(state, list) and not state:
        return torch.zeros(shape, dtype=dtype)
    return dim_zero_cat(state).cpu()


class ConfidenceCurves(Metric):
    """Gathers YOLOv5-matched predictions and targets; ``compute`` returns a ``CurveResult``."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    scores: list[Tensor]
    pred_labels: list[Tensor]
    correct: list[Tensor]
    target_labels: list[Tensor]

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("scores", default=[], dist_reduce_fx="cat")
        self.add_state("pred_labels", default=[], dist_reduce_fx="cat")
        self.add_state("correct", default=[], dist_reduce_fx="cat")
        self.add_state("target_labels", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        """Match one batch of images (torchmetrics detection format, xyxy pixels) and store the result."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} prediction dicts but {len(targets)} target dicts")
        if not preds:
            return
        thresholds = _iou_thresholds(self.device)
        # One entry per batch rather than per image keeps the state lists short over an epoch.
        matched = [
            match_predictions(p["boxes"], p["scores"], p["labels"], t["boxes"], t["labels"], thresholds)
            for p, t in zip(preds, targets)
        ]
        self.correct.append(torch.cat(matched))
        self.scores.append(torch.cat([p["scores"].float().reshape(-1) for p in preds]))
        self.pred_labels.append(torch.cat([p["labels"].long().reshape(-1) for p in preds]))
        self.target_labels.append(torch.cat([t["labels"].long().reshape(-1) for t in targets]))

    def compute(self) -> CurveResult:
        """Return the YOLOv5-style curves, per-class AP and best-F1 operating point over all updates."""
        num_thr = _iou_thresholds().shape[0]
        return compute_curves(
            _cat(self.scores, (0,), torch.float32).double().numpy(),
            _cat(self.pred_labels, (0,), torch.long).numpy(),
            _cat(self.correct, (0, num_thr), torch.bool).numpy(),
            _cat(self.target_labels, (0,), torch.long).numpy(),
        )


def _gather_states(metric: Metric) -> None:
    """Replace each list state of `metric` by every process's list, concatenated in rank order.

    torchmetrics gathers list states one element (image) at a time, which needs the same number of images on every
    process; distributed evaluation deals out whole batches (data/sampler.py), so the counts can differ.
    """
    parts: list = [None] * dist.get_world_size()
    for name in metric.metric_state:
        dist.all_gather_object(parts, [t.cpu() for t in getattr(metric, name)])
        setattr(metric, name, [t.to(metric.device) for part in parts for t in part])


class DetectionMetrics(nn.Module):
    """COCO mAP (torchmetrics) plus YOLOv5-style P/R/F1/AP (``ConfidenceCurves``) behind one update."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.coco = MeanAveragePrecision(
            box_format="xyxy",
            iou_type="bbox",
            backend="faster_coco_eval",
            max_detection_thresholds=[1, 10, 300],
            class_metrics=True,
            sync_on_compute=False,  # gathered by _gather_states
        )
        self.curves = ConfidenceCurves(sync_on_compute=False)

    def update(self, preds: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]]) -> None:
        """Feed one batch (torchmetrics detection format, xyxy pixels) to both metrics; returns None."""
        self.coco.update(preds, targets)
        self.curves.update(preds, targets)

    def compute(self) -> dict[str, Any]:
        """Return mAP50, mAP50-95, precision, recall, f1, conf, ap50_per_class, ap_per_class and curves (over all
        processes' images when distributed)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            _gather_states(self.coco)
            _gather_states(self.curves)
        coco = self.coco.compute()
        curves = self.curves.compute()
        if len(curves.classes) and curves.classes.max() >= self.num_classes:
            raise ValueError(f"target class {curves.classes.max()} >= num_classes={self.num_classes}")
        ap50 = torch.zeros(self.num_classes)
        ap = torch.zeros(self.num_classes)
        index = torch.from_numpy(curves.classes)
        ap50[index] = torch.from_numpy(curves.ap[:, 0]).float()
        ap[index] = torch.from_numpy(curves.ap.mean(1)).float()
        return {
            # torchmetrics reports -1 when there is nothing to evaluate.
            "mAP50": max(float(coco["map_50"]), 0.0),
            "mAP50-95": max(float(coco["map"]), 0.0),
            "precision": curves.precision,
            "recall": curves.recall,
            "f1": curves.f1,
            "conf": curves.conf,
            "ap50_per_class": ap50,
            "ap_per_class": ap,
            "curves": curves,
        }

    def reset(self) -> None:
        """Clear the state of both metrics; returns None."""
        self.coco.reset()
        self.curves.reset()
