"""Detection validation metrics matching YOLOv5's val.py, and their curve plots."""

from tea_lightning.metrics.detection import ConfidenceCurves, DetectionMetrics
from tea_lightning.metrics.plots import plot_curves

__all__ = ["ConfidenceCurves", "DetectionMetrics", "plot_curves"]
