"""YOLOv5-style PR, precision, recall and F1 curve plots of a ``CurveResult``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from tea_lightning.metrics.detection import CurveResult

__all__ = ["curve_figures", "plot_curves", "save_curve_arrays"]

# Above this many classes per-class lines are drawn grey and unlabelled, or the legend would swamp the plot.
MAX_LEGEND_CLASSES = 20


def _class_names(curves: CurveResult, names: list[str]) -> list[str]:
    """Return a display name per row of ``curves``, falling back to the class id."""
    return [names[c] if c < len(names) else str(c) for c in curves.classes]


def _class_mean(rows: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Return the mean over classes, or zeros when there are no classes."""
    return rows.mean(0) if len(rows) else np.zeros_like(px)


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, Axes]:
    """Return a fresh figure and its axes, labelled and limited to the unit square."""
    # Figure() bypasses pyplot: no global backend switch and nothing left open to leak.
    fig = Figure(figsize=(9, 6))
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    return fig, ax


def _plot_classes(ax: Axes, x: np.ndarray, rows: np.ndarray, labels: list[str]) -> None:
    """Draw one thin line per class, labelled only when the legend stays readable; returns None."""
    few = len(rows) <= MAX_LEGEND_CLASSES
    for row, label in zip(rows, labels):
        if few:
            ax.plot(x, row, linewidth=1, label=label)
        else:
            ax.plot(x, row, linewidth=1, color="grey", alpha=0.5)


def _finish(ax: Axes) -> None:
    """Place the legend outside the axes on the right; returns None."""
    ax.legend(bbox_to_anchor=(1.04, 1), loc="upper left")


def curve_figures(curves: CurveResult, names: list[str]) -> dict[str, Figure]:
    """Return the PR, P, R and F1 figures keyed by their file names."""
    px = curves.px
    class_names = _class_names(curves, names)
    figures = {}

    fig, ax = _new_axes("Precision-Recall Curve", "Recall", "Precision")
    _plot_classes(ax, px, curves.pr_curve, [f"{n} {ap:.3f}" for n, ap in zip(class_names, curves.ap50)])
    ax.plot(
        px,
        _class_mean(curves.pr_curve, px),
        linewidth=3,
        color="blue",
        label=f"all classes {curves.map50:.3f} mAP@0.5",
    )
    _finish(ax)
    figures["PR_curve.png"] = fig

    for file_name, ylabel, rows, value in (
        ("P_curve.png", "Precision", curves.precision_curve, curves.precision),
        ("R_curve.png", "Recall", curves.recall_curve, curves.recall),
        ("F1_curve.png", "F1", curves.f1_curve, curves.f1),
    ):
        fig, ax = _new_axes(f"{ylabel}-Confidence Curve", "Confidence", ylabel)
        _plot_classes(ax, px, rows, class_names)
        ax.plot(
            px,
            _class_mean(rows, px),
            linewidth=3,
            color="blue",
            label=f"all classes {value:.2f} at {curves.conf:.3f}",
        )
        # Marks the confidence that P, R and F1 are reported at (chosen by max smoothed mean F1).
        ax.axvline(curves.conf, color="blue", linestyle="--", linewidth=1)
        _finish(ax)
        figures[file_name] = fig
    return figures


def save_curve_arrays(curves: CurveResult, path: Path) -> Path:
    """Write the class-mean curves and their operating point to an .npz file, so that curves of several runs can
    be overlaid later (`tea-lightning report`) without re-validating; return the path."""
    np.savez(path, px=curves.px, pr=_class_mean(curves.pr_curve, curves.px),
             precision=_class_mean(curves.precision_curve, curves.px),
             recall=_class_mean(curves.recall_curve, curves.px), f1=_class_mean(curves.f1_curve, curves.px),
             map50=curves.map50, conf=curves.conf)
    return path


def plot_curves(curves: CurveResult, names: list[str], out_dir: Path) -> list[Path]:
    """Return the paths of PR_curve.png, P_curve.png, R_curve.png and F1_curve.png written to ``out_dir``; the
    curves' arrays go beside them as curves.npz."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_curve_arrays(curves, out_dir / "curves.npz")
    paths = []
    for file_name, fig in curve_figures(curves, names).items():
        path = out_dir / file_name
        fig.savefig(path, dpi=250, bbox_inches="tight")
        paths.append(path)
    return paths
