"""NMS as YOLOv5's validation does it, and mapping boxes back through the letterbox."""

import torch
from torchvision.ops import batched_nms, box_convert

from tea_lightning.model.postprocess import non_max_suppression, unletterbox_boxes


def raw_predictions(n=6000, nc=3, seed=0):
    """Return (1, n, 5 + nc) predictions: clustered boxes (many overlaps), objectness and class scores."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.rand(40, 2, generator=g) * 400
    xy = centres[torch.randint(0, 40, (n,), generator=g)] + torch.randn(n, 2, generator=g) * 6
    wh = 20 + torch.rand(n, 2, generator=g) * 40
    return torch.cat([xy, wh, torch.rand(n, 1 + nc, generator=g) ** 3], 1)[None]


def reference_nms(prediction, conf=0.001, iou=0.6, max_det=300):
    """The straightforward version: every candidate through NMS, then the best max_det."""
    x = prediction[0][prediction[0][:, 4] > conf]
    scores = x[:, 5:] * x[:, 4:5]
    i, j = (scores > conf).nonzero(as_tuple=True)
    det = torch.cat([box_convert(x[i, :4], "cxcywh", "xyxy"), scores[i, j, None], j[:, None].float()], 1)
    det = det[det[:, 4].argsort(descending=True)[:30000]]
    return det[batched_nms(det[:, :4], det[:, 4], det[:, 5].long(), iou)[:max_det]]


def test_nms_equals_nms_over_all_candidates():
    for seed in range(3):
        prediction = raw_predictions(seed=seed)
        (ours,) = non_max_suppression(prediction)
        assert len(ours) == 300
        assert torch.equal(ours, reference_nms(prediction))


def test_nms_when_fewer_than_max_det_survive():
    prediction = raw_predictions(n=500)
    (ours,) = non_max_suppression(prediction, max_det=300)
    assert torch.equal(ours, reference_nms(prediction))


def test_multi_label_gives_one_box_per_class_above_threshold():
    prediction = torch.tensor([[[50.0, 50, 20, 20, 0.9, 0.9, 0.8, 0.0001]]])
    (det,) = non_max_suppression(prediction, conf_thres=0.01)
    assert det[:, 5].tolist() == [0.0, 1.0]
    assert torch.allclose(det[:, 4], torch.tensor([0.81, 0.72]))
    assert torch.allclose(det[0, :4], torch.tensor([40.0, 40, 60, 60]))
    (single,) = non_max_suppression(prediction, conf_thres=0.01, multi_label=False)
    assert single[:, 5].tolist() == [0.0]


def test_unletterbox_inverts_scale_and_padding_and_clips():
    boxes = torch.tensor([[26.0, 66, 126, 166], [0, 0, 400, 400]])
    back = unletterbox_boxes(boxes, 2.0, torch.tensor([16.0, 16.0]), torch.tensor([100.0, 150.0]))
    assert torch.allclose(back[0], torch.tensor([5.0, 25, 55, 75]))
    assert torch.allclose(back[1], torch.tensor([0.0, 0, 150, 100]))
