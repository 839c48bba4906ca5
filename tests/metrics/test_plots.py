"""Tests for the YOLOv5-style curve plots."""

from __future__ import annotations

import matplotlib.image
import pytest
import torch

from tea_lightning.metrics import ConfidenceCurves, plot_curves
from tea_lightning.metrics.plots import MAX_LEGEND_CLASSES, curve_figures

FILE_NAMES = ["PR_curve.png", "P_curve.png", "R_curve.png", "F1_curve.png"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def curves_for(num_classes: int):
    """Return a ConfidenceCurves result with one hit, one miss and one false positive per class."""
    preds, targets = [], []
    for cls in range(num_classes):
        offset = 10.0 * cls
        targets.append(
            {
                "boxes": torch.tensor([[offset, 0, offset + 100, 100], [300, 300, 400, 400]]),
                "labels": torch.tensor([cls, cls]),
            }
        )
        preds.append(
            {
                "boxes": torch.tensor([[offset, 0, offset + 100, 100], [600, 600, 650, 650]]),
                "scores": torch.tensor([0.9, 0.4]),
                "labels": torch.tensor([cls, cls]),
            }
        )
    metric = ConfidenceCurves()
    metric.update(preds, targets)
    return metric.compute()


@pytest.fixture(scope="module")
def three_class_curves():
    return curves_for(3)


def test_writes_four_valid_pngs(three_class_curves, tmp_path):
    out_dir = tmp_path / "plots"
    paths = plot_curves(three_class_curves, ["bud", "leaf", "stem"], out_dir)
    assert [p.name for p in paths] == FILE_NAMES
    for path in paths:
        assert path.parent == out_dir
        assert path.read_bytes()[:8] == PNG_SIGNATURE
        height, width, _ = matplotlib.image.imread(path).shape
        # dpi=250 on a 9x6 inch figure; the outside legend must widen it rather than being cut off.
        assert height > 1000
        assert width > 9 * 250


def test_legend_has_one_entry_per_class_plus_all(three_class_curves):
    figures = curve_figures(three_class_curves, ["bud", "leaf", "stem"])
    assert list(figures) == FILE_NAMES
    pr_texts = [t.get_text() for t in figures["PR_curve.png"].axes[0].get_legend().get_texts()]
    ap50 = three_class_curves.ap50
    assert ap50 == pytest.approx([ap50[0]] * 3)  # identical classes by construction
    assert pr_texts == [f"{n} {ap50[0]:.3f}" for n in ("bud", "leaf", "stem")] + [
        f"all classes {ap50[0]:.3f} mAP@0.5"
    ]
    f1 = three_class_curves.f1
    f1_texts = [t.get_text() for t in figures["F1_curve.png"].axes[0].get_legend().get_texts()]
    assert f1_texts == ["bud", "leaf", "stem", f"all classes {f1:.2f} at {three_class_curves.conf:.3f}"]


def test_axes_labels_and_limits(three_class_curves):
    figures = curve_figures(three_class_curves, ["bud", "leaf", "stem"])
    expected = {
        "PR_curve.png": ("Recall", "Precision"),
        "P_curve.png": ("Confidence", "Precision"),
        "R_curve.png": ("Confidence", "Recall"),
        "F1_curve.png": ("Confidence", "F1"),
    }
    for name, (xlabel, ylabel) in expected.items():
        ax = figures[name].axes[0]
        assert (ax.get_xlabel(), ax.get_ylabel()) == (xlabel, ylabel), name
        assert ax.get_xlim() == (0.0, 1.0)
        assert ax.get_ylim() == (0.0, 1.0)


def test_many_classes_only_label_all_classes():
    curves = curves_for(MAX_LEGEND_CLASSES + 1)
    figure = curve_figures(curves, [])["PR_curve.png"]
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert len(texts) == 1
    assert texts[0].startswith("all classes")
    assert len(figure.axes[0].get_lines()) == MAX_LEGEND_CLASSES + 2


def test_missing_names_fall_back_to_class_ids(three_class_curves):
    figure = curve_figures(three_class_curves, ["bud"])["P_curve.png"]
    texts = [t.get_text() for t in figure.axes[0].get_legend().get_texts()]
    assert texts[:3] == ["bud", "1", "2"]


def test_empty_result_still_plots():
    with pytest.warns(UserWarning, match="compute"):
        curves = ConfidenceCurves().compute()
    figures = curve_figures(curves, [])
    texts = [t.get_text() for t in figures["PR_curve.png"].axes[0].get_legend().get_texts()]
    assert texts == ["all classes 0.000 mAP@0.5"]
    for figure in figures.values():
        figure.canvas.draw()
