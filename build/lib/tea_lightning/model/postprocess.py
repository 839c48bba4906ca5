"""From raw YOLOv5 outputs to detections on the original image: NMS as YOLOv5's val.py does it, and the inverse
of the letterbox."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, box_convert


def non_max_suppression(prediction: torch.Tensor, conf_thres: float = 0.001, iou_thres: float = 0.6,
                        max_det: int = 300, multi_label: bool = True, max_nms: int = 30000) -> list[torch.Tensor]:
    """Return per image a (n, 6) tensor [x1, y1, x2, y2, confidence, class] from (B, N, 5 + nc) predictions.

    Confidence is objectness x class probability; with `multi_label` a box appears once for every class above
    the threshold (YOLOv5's validation setting), and NMS runs per class.
    """
    output = []
    for x in prediction.float():
        x = x[x[:, 4] > conf_thres]
        scores = x[:, 5:] * x[:, 4:5]
        boxes = box_convert(x[:, :4], "cxcywh", "xyxy")
        if multi_label:
            i, j = (scores > conf_thres).nonzero(as_tuple=True)
            detections = torch.cat([boxes[i], scores[i, j, None], j[:, None].float()], dim=1)
        else:
            conf, j = scores.max(1, keepdim=True)
            detections = torch.cat([boxes, conf, j.float()], dim=1)[conf.view(-1) > conf_thres]
        detections = detections[detections[:, 4].argsort(descending=True)[:max_nms]]
        output.append(detections[_top_nms(detections, iou_thres, max_det)])
    return output


def _top_nms(detections: torch.Tensor, iou_thres: float, max_det: int) -> torch.Tensor:
    """Return the indices of the first `max_det` boxes that per-class NMS keeps, from score-sorted detections.

    Greedy NMS decides each box from the higher-scoring boxes alone, so NMS over the best k candidates keeps
    exactly the boxes that NMS over all of them keeps among those k. Once that is max_det boxes, the rest cannot
    change the result. On an early, unsure model this runs NMS on a few thousand of the up to 30000 candidates
    instead of all of them: the same detections, several times faster (NMS costs grow with the square of the count).
    """
    count = len(detections)
    k = min(count, 10 * max_det)
    while True:
        keep = batched_nms(detections[:k, :4], detections[:k, 4], detections[:k, 5].long(), iou_thres)
        if len(keep) >= max_det or k == count:
            return keep[:max_det]
        k = min(count, 4 * k)


def unletterbox_boxes(boxes: torch.Tensor, ratio: float, pad: torch.Tensor, original_shape: torch.Tensor
                      ) -> torch.Tensor:
    """Return xyxy boxes mapped from the letterboxed image back to the original one, clipped to it."""
    boxes = boxes.clone()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad[0]) / ratio).clamp(0, float(original_shape[1]))
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad[1]) / ratio).clamp(0, float(original_shape[0]))
    return boxes
