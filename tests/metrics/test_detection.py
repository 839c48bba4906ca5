"""Tests for the YOLOv5-compatible detection metrics."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torchmetrics.detection import MeanAveragePrecision

from tea_lightning.metrics import ConfidenceCurves, DetectionMetrics
from tea_lightning.metrics.detection import CurveResult, match_predictions

IOU_THRESHOLDS = torch.linspace(0.5, 0.95, 10)
EXPECTED_KEYS = {
    "mAP50",
    "mAP50-95",
    "precision",
    "recall",
    "f1",
    "conf",
    "ap50_per_class",
    "ap_per_class",
    "curves",
}


def pred(boxes, scores, labels):
    """Return a torchmetrics prediction dict built from plain lists."""
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "scores": torch.tensor(scores, dtype=torch.float32),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def target(boxes, labels):
    """Return a torchmetrics target dict built from plain lists."""
    return {
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(labels, dtype=torch.long),
    }


def evaluate(preds, targets, num_classes=2):
    """Return DetectionMetrics.compute() after a single update."""
    metrics = DetectionMetrics(num_classes)
    metrics.update(preds, targets)
    return metrics.compute()


def synthetic_dataset(num_images=32, num_classes=3, seed=12345):
    """Return (preds, targets) as lists; a pure-Python LCG makes them identical in any environment.

    Class ``num_classes`` appears only among background false positives, never in targets.
    """
    state = seed

    def rand():
        nonlocal state
        state = (1103515245 * state + 12345) % 2**31
        return state / 2**31

    def jitter(box, amount):
        w, h = box[2] - box[0], box[3] - box[1]
        return [
            box[0] + (rand() - 0.5) * amount * w,
            box[1] + (rand() - 0.5) * amount * h,
            box[2] + (rand() - 0.5) * amount * w,
            box[3] + (rand() - 0.5) * amount * h,
        ]

    preds, targets = [], []
    for _ in range(num_images):
        t_boxes, t_labels, p_boxes, p_scores, p_labels = [], [], [], [], []
        for _ in range(int(rand() * 6)):
            x, y, w, h = rand() * 500, rand() * 500, 20 + rand() * 120, 20 + rand() * 120
            box, label = [x, y, x + w, y + h], int(rand() * num_classes)
            t_boxes.append(box)
            t_labels.append(label)
            for _ in range(int(rand() * 3)):
                wrong = rand() < 0.15
                p_boxes.append(jitter(box, 0.3))
                p_labels.append((label + 1) % num_classes if wrong else label)
                p_scores.append(0.05 + 0.95 * rand())
        for _ in range(int(rand() * 3)):
            x, y = rand() * 500, rand() * 500
            p_boxes.append([x, y, x + 20 + rand() * 100, y + 20 + rand() * 100])
            p_labels.append(int(rand() * (num_classes + 1)))
            p_scores.append(0.05 + 0.5 * rand())
        preds.append({"boxes": p_boxes, "scores": p_scores, "labels": p_labels})
        targets.append({"boxes": t_boxes, "labels": t_labels})
    return preds, targets


def synthetic_tensors():
    """Return the synthetic dataset as torchmetrics-format tensors."""
    preds, targets = synthetic_dataset()
    return (
        [pred(p["boxes"], p["scores"], p["labels"]) for p in preds],
        [target(t["boxes"], t["labels"]) for t in targets],
    )


def assert_same_curves(a: CurveResult, b: CurveResult):
    """Fail unless every field of the two results is equal."""
    for field in dataclasses.fields(CurveResult):
        np.testing.assert_array_equal(getattr(a, field.name), getattr(b, field.name), err_msg=field.name)


# --- hand-made cases -------------------------------------------------------------------------------


def test_perfect_predictions():
    targets = [target([[0, 0, 100, 100], [200, 200, 300, 300]], [0, 1]), target([[50, 50, 150, 150]], [0])]
    preds = [
        pred([[0, 0, 100, 100], [200, 200, 300, 300]], [0.9, 0.8], [0, 1]),
        pred([[50, 50, 150, 150]], [0.7], [0]),
    ]
    out = evaluate(preds, targets)
    assert out["mAP50"] == pytest.approx(1.0)
    assert out["mAP50-95"] == pytest.approx(1.0)
    assert out["precision"] == 1.0
    assert out["recall"] == 1.0
    assert out["f1"] == pytest.approx(1.0)
    # YOLOv5's AP peaks at 0.995, not 1: its 101-point sample at recall 1 hits the (1, 0) sentinel.
    torch.testing.assert_close(out["ap50_per_class"], torch.tensor([0.995, 0.995]))
    torch.testing.assert_close(out["ap_per_class"], torch.tensor([0.995, 0.995]))
    np.testing.assert_array_equal(out["curves"].tp, [2, 1])
    np.testing.assert_array_equal(out["curves"].fp, [0, 0])


def test_false_positive_below_all_true_positives():
    targets = [target([[0, 0, 100, 100], [200, 200, 300, 300]], [0, 0])]
    preds = [pred([[0, 0, 100, 100], [200, 200, 300, 300], [400, 400, 450, 450]], [0.9, 0.8, 0.3], [0, 0, 0])]
    out = evaluate(preds, targets, num_classes=1)
    curves = out["curves"]
    # Ranked after both hits, the false positive costs neither COCO AP nor (beyond 0.995) YOLOv5 AP.
    assert out["mAP50"] == pytest.approx(1.0)
    assert out["ap50_per_class"].item() == pytest.approx(0.995)
    # At confidence 0 every prediction counts: 2 hits out of 3 predictions, 2 of 2 targets.
    assert curves.precision_curve[0, 0] == pytest.approx(2 / 3)
    assert curves.recall_curve[0, 0] == 1.0
    # Above the highest score nothing is kept: YOLOv5 defines precision 1 and recall 0 there.
    assert curves.precision_curve[0, -1] == 1.0
    assert curves.recall_curve[0, -1] == 0.0
    # The best-F1 confidence lies between the last hit (0.8) and the false positive (0.3), where YOLOv5
    # interpolates precision linearly from 1 (at 0.8) to 2/3 (at 0.3) and recall stays 1.
    assert 0.3 < out["conf"] < 0.8
    assert out["recall"] == pytest.approx(1.0)
    assert out["precision"] == pytest.approx(1 - (0.8 - out["conf"]) / 3 / 0.5)
    np.testing.assert_array_equal(curves.tp, [2])
    np.testing.assert_array_equal(curves.fp, [0])


def test_missed_target_halves_recall():
    targets = [target([[0, 0, 100, 100], [200, 200, 300, 300]], [0, 0])]
    preds = [pred([[0, 0, 100, 100]], [0.9], [0])]
    out = evaluate(preds, targets, num_classes=1)
    assert out["precision"] == 1.0
    assert out["recall"] == 0.5
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["conf"] == 0.0
    # YOLOv5 draws a line from (recall 0.5, precision 1) to its (1, 0) sentinel: area 0.5 + 0.25.
    assert out["ap50_per_class"].item() == pytest.approx(0.75)
    # COCO stops at the reached recall: 51 of its 101 recall points (0.00..0.50) have precision 1.
    assert out["mAP50"] == pytest.approx(51 / 101, abs=1e-6)


def test_false_positive_in_image_without_targets():
    preds = [pred([[0, 0, 100, 100]], [0.8], [0]), pred([[0, 0, 100, 100]], [0.9], [0])]
    targets = [target([[0, 0, 100, 100]], [0]), target([], [])]
    out = evaluate(preds, targets, num_classes=1)
    # Reference from YOLOv5 7.0.14 val.process_batch + ap_per_class (see test_matches_yolov5_reference).
    assert out["ap50_per_class"].item() == pytest.approx(0.4975)
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(1.0)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["mAP50"] == pytest.approx(0.5)


# --- matching ---------------------------------------------------------------------------------------


def test_prediction_overlapping_two_targets_matches_only_one():
    # IoU of the prediction with each target is 95/105 ~ 0.905.
    targets = [target([[0, 0, 100, 100], [10, 0, 110, 100]], [0, 0])]
    preds = [pred([[5, 0, 105, 100]], [0.9], [0])]
    metric = ConfidenceCurves()
    metric.update(preds, targets)
    correct = metric.correct[0]
    assert correct.shape == (1, 10)
    assert correct[0, :9].all()  # one target matched up to IoU 0.90
    assert not correct[0, 9]
    curves = metric.compute()
    np.testing.assert_array_equal(curves.tp, [1])
    assert curves.recall == pytest.approx(0.5)


def test_wrong_class_never_matches():
    correct = match_predictions(
        torch.tensor([[0.0, 0, 100, 100]]),
        torch.tensor([0.9]),
        torch.tensor([1]),
        torch.tensor([[0.0, 0, 100, 100]]),
        torch.tensor([0]),
        IOU_THRESHOLDS,
    )
    assert not correct.any()


def test_target_goes_to_higher_scoring_prediction_like_yolov5():
    # Expected rows produced once with YOLOv5 7.0.14 yolov5.val.process_batch on the same boxes (given
    # to it sorted by score, as NMS output is): a target claimed by several predictions goes to the
    # higher-scoring one, not the higher-IoU one, while the IoU of the winner still passes.
    boxes = torch.tensor([[0.0, 0, 90, 100], [0, 0, 60, 100]])  # IoU 0.9 at score 0.5, IoU 0.6 at 0.9
    correct = match_predictions(
        boxes,
        torch.tensor([0.5, 0.9]),
        torch.tensor([0, 0]),
        torch.tensor([[0.0, 0, 100, 100]]),
        torch.tensor([0]),
        IOU_THRESHOLDS,
    )
    assert correct.int().tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]]


def test_loser_does_not_fall_back_to_second_best_target_like_yolov5():
    # The second prediction's best target (IoU 0.96) is taken; YOLOv5 leaves it a false positive even
    # though it overlaps the free second target with IoU 0.85 (checked with yolov5.val.process_batch).
    correct = match_predictions(
        torch.tensor([[0.0, 0, 100, 100], [2, 0, 102, 100]]),
        torch.tensor([0.9, 0.8]),
        torch.tensor([0, 0]),
        torch.tensor([[0.0, 0, 100, 100], [10, 0, 110, 100]]),
        torch.tensor([0, 0]),
        IOU_THRESHOLDS,
    )
    assert correct[0].all()
    assert not correct[1].any()


def test_matching_does_not_depend_on_prediction_order():
    preds, targets = synthetic_tensors()
    p, t = max(zip(preds, targets), key=lambda pair: len(pair[0]["scores"]))
    perm = torch.randperm(len(p["scores"]), generator=torch.Generator().manual_seed(0))
    base = match_predictions(p["boxes"], p["scores"], p["labels"], t["boxes"], t["labels"], IOU_THRESHOLDS)
    shuffled = match_predictions(
        p["boxes"][perm], p["scores"][perm], p["labels"][perm], t["boxes"], t["labels"], IOU_THRESHOLDS
    )
    assert base.any() and not base.all()
    torch.testing.assert_close(shuffled, base[perm])


# --- reference numbers ------------------------------------------------------------------------------


def test_matches_yolov5_reference():
    # Produced once in a separate numpy-1.26 venv with the `yolov5` 7.0.14 package: each image's
    # predictions sorted by score, matched with yolov5.val.process_batch(det, labels,
    # torch.linspace(0.5, 0.95, 10)), the concatenated stats fed to
    # yolov5.utils.metrics.ap_per_class; p, r, f1 are its outputs, ap50 = ap[:, 0], ap = ap.mean(1).
    preds, targets = synthetic_dataset()
    # Guards that the generator still yields the data the reference was computed on.
    assert sum(len(p["scores"]) for p in preds) == 116
    assert sum(len(t["labels"]) for t in targets) == 78
    assert sum(sum(map(sum, p["boxes"])) for p in preds) == pytest.approx(127177.57498329591)

    metric = ConfidenceCurves()
    metric.update(*synthetic_tensors())
    assert torch.cat(metric.correct).sum(0).tolist() == [50, 50, 50, 48, 39, 22, 12, 6, 3, 0]
    curves = metric.compute()
    np.testing.assert_array_equal(curves.classes, [0, 1, 2])
    reference = {
        "class_precision": [0.6178833336526556, 0.4352061989837946, 0.5539415670196592],
        "class_recall": [0.5021900389895243, 0.6363636363636364, 0.5555555555555556],
        "class_f1": [0.5540616588108671, 0.516904060225864, 0.5547473873508116],
        "ap50": [0.5915606465166712, 0.5131725490196078, 0.6130269332977496],
    }
    for name, expected in reference.items():
        np.testing.assert_allclose(getattr(curves, name), expected, atol=1e-9, err_msg=name)
    np.testing.assert_allclose(
        curves.ap.mean(1), [0.29570289327016297, 0.3268498979361098, 0.2979355240360769], atol=1e-9
    )


def test_ap50_close_to_coco_when_recall_is_complete():
    # Independent check against COCO AP. Every target gets one detection, so recall reaches ~1 and the two
    # AP definitions differ only in interpolation detail; below full recall YOLOv5's sentinel line to
    # (1, 0) adds area COCO does not (see test_missed_target_halves_recall).
    g = torch.Generator().manual_seed(0)
    preds, targets = [], []
    for _ in range(40):
        n = int(torch.randint(1, 6, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * 500
        wh = 20 + torch.rand(n, 2, generator=g) * 100
        boxes = torch.cat([xy, xy + wh], 1)
        labels = torch.randint(0, 3, (n,), generator=g)
        hits = boxes + torch.randn(n, 4, generator=g) * 0.1 * wh.repeat(1, 2)
        fxy = torch.rand(2, 2, generator=g) * 500
        false = torch.cat([fxy, fxy + 60], 1)
        preds.append(
            {
                "boxes": torch.cat([hits, false]),
                "scores": torch.cat(
                    [0.5 + 0.5 * torch.rand(n, generator=g), 0.7 * torch.rand(2, generator=g)]
                ),
                "labels": torch.cat([labels, torch.randint(0, 3, (2,), generator=g)]),
            }
        )
        targets.append({"boxes": boxes, "labels": labels})
    coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    coco.update(preds, targets)
    curves = ConfidenceCurves()
    curves.update(preds, targets)
    assert curves.compute().map50 == pytest.approx(coco.compute()["map_50"].item(), abs=0.02)


# --- empty inputs -----------------------------------------------------------------------------------


def test_no_predictions():
    targets = [target([[0, 0, 10, 10]], [0]), target([[5, 5, 20, 20]], [1])]
    out = evaluate([pred([], [], []), pred([], [], [])], targets)
    assert out["mAP50"] == 0.0
    assert out["mAP50-95"] == 0.0
    assert (out["precision"], out["recall"], out["f1"], out["conf"]) == (0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(out["ap50_per_class"], torch.zeros(2))
    np.testing.assert_array_equal(out["curves"].classes, [0, 1])


def test_all_empty():
    metrics = DetectionMetrics(2)
    metrics.update([pred([], [], [])], [target([], [])])
    out = metrics.compute()
    assert set(out) == EXPECTED_KEYS
    # torchmetrics reports -1 for "nothing to evaluate"; the wrapper must turn it into 0.
    assert out["mAP50"] == 0.0
    assert out["mAP50-95"] == 0.0
    assert (out["precision"], out["recall"], out["f1"], out["conf"]) == (0.0, 0.0, 0.0, 0.0)
    torch.testing.assert_close(out["ap_per_class"], torch.zeros(2))
    assert out["curves"].classes.shape == (0,)
    assert out["curves"].pr_curve.shape == (0, 1000)


def test_confidence_curves_before_any_update():
    with pytest.warns(UserWarning, match="compute"):
        curves = ConfidenceCurves().compute()
    assert curves.classes.shape == (0,)
    assert curves.map == 0.0


def test_class_only_in_predictions_is_ignored():
    targets = [target([[0, 0, 100, 100]], [0])]
    base = evaluate([pred([[0, 0, 100, 100]], [0.8], [0])], targets)
    extra = evaluate([pred([[0, 0, 100, 100], [200, 200, 300, 300]], [0.8, 0.9], [0, 1])], targets)
    np.testing.assert_array_equal(extra["curves"].classes, [0])
    assert extra["ap50_per_class"][1] == 0.0
    for key in ("mAP50", "mAP50-95", "precision", "recall", "f1"):
        assert extra[key] == pytest.approx(base[key]), key


# --- DetectionMetrics plumbing ----------------------------------------------------------------------


def test_keys_and_types():
    out = evaluate(*synthetic_tensors(), num_classes=4)
    assert set(out) == EXPECTED_KEYS
    for key in ("mAP50", "mAP50-95", "precision", "recall", "f1", "conf"):
        assert isinstance(out[key], float), key
        assert 0.0 <= out[key] <= 1.0, key
    assert out["ap50_per_class"].shape == (4,)
    assert out["ap_per_class"].shape == (4,)
    assert isinstance(out["curves"], CurveResult)
    np.testing.assert_allclose(out["ap50_per_class"][:3].numpy(), out["curves"].ap50, atol=1e-6)


def test_accumulating_updates_equals_one_big_update():
    preds, targets = synthetic_tensors()
    whole = DetectionMetrics(4)
    whole.update(preds, targets)
    parts = DetectionMetrics(4)
    for start in range(0, len(preds), 5):
        parts.update(preds[start : start + 5], targets[start : start + 5])
    a, b = whole.compute(), parts.compute()
    assert_same_curves(a.pop("curves"), b.pop("curves"))
    for key in a:
        torch.testing.assert_close(torch.as_tensor(a[key]), torch.as_tensor(b[key]), msg=key)


def test_reset_forgets_previous_updates():
    preds, targets = synthetic_tensors()
    fresh = DetectionMetrics(4)
    fresh.update(preds[8:], targets[8:])
    reused = DetectionMetrics(4)
    reused.update(preds[:8], targets[:8])
    reused.compute()
    reused.reset()
    reused.update(preds[8:], targets[8:])
    a, b = fresh.compute(), reused.compute()
    assert_same_curves(a.pop("curves"), b.pop("curves"))
    assert a["mAP50"] == b["mAP50"]
    assert a["mAP50-95"] == b["mAP50-95"]


def test_distributed_gather_concatenates_states():
    # A fake two-rank all-gather where both ranks saw the same data must equal seeing the data twice.
    preds, targets = synthetic_tensors()
    synced = ConfidenceCurves(
        dist_sync_fn=lambda x, group=None: [x, x], distributed_available_fn=lambda: True
    )
    synced.update(preds, targets)
    twice = ConfidenceCurves()
    twice.update(preds, targets)
    twice.update(preds, targets)
    assert_same_curves(synced.compute(), twice.compute())


def test_rejects_class_ids_beyond_num_classes():
    metrics = DetectionMetrics(1)
    metrics.update([pred([], [], [])], [target([[0, 0, 10, 10]], [3])])
    with pytest.raises(ValueError, match="num_classes"):
        metrics.compute()


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))],
)
def test_device_move(device):
    metrics = DetectionMetrics(4).to(device)
    assert metrics.curves.device.type == device
    assert metrics.coco.device.type == device
    preds, targets = synthetic_tensors()
    move = lambda d: {k: v.to(device) for k, v in d.items()}  # noqa: E731
    metrics.update([move(p) for p in preds], [move(t) for t in targets])
    out = metrics.compute()
    reference = evaluate(preds, targets, num_classes=4)
    assert_same_curves(out["curves"], reference["curves"])
    assert out["mAP50"] == pytest.approx(reference["mAP50"])
