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
        keep = batched_nms(detections[:, :4], detections[:, 4], detections[:, 5].long(), iou_thres)[:max_det]
        output.append(detections[keep])
    return output


def unletterbox_boxes(boxes: torch.Tensor, ratio: float, pad: torch.Tensor, original_shape: torch.Tensor
                      ) -> torch.Tensor:
    """Return xyxy boxes mapped from the letterboxed image back to the original one, clipped to it."""
    boxes = boxes.clone()
    boxes[:, [0, 2]] = ((boxes[:, [0, 2]] - pad[0]) / ratio).clamp(0, float(original_shape[1]))
    boxes[:, [1, 3]] = ((boxes[:, [1, 3]] - pad[1]) / ratio).clamp(0, float(original_shape[0]))
    return boxes
