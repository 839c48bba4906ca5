"""The study report's figures: overlaid P/R/F1/PR curves and loss curves per model, and the accuracy-cost trade-off
with its Pareto front. Figure() without pyplot, as in metrics/plots.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tea_lightning.model.detector import LOSS_NAMES


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")  # tight: outside legends widen the image, never cut off
    return path


def curve_overlay(title: str, curves: list[tuple[str, dict]], path: Path) -> Path:
    """Draw the class-mean PR, precision, recall and F1 curves of several runs (label, curves.npz arrays) on a
    2x2 grid with one shared legend; return the path."""
    fig = Figure(figsize=(12, 9.5), layout="constrained")
    fig.suptitle(title)
    panels = (("pr", "Precision-recall (IoU 0.5)", "Recall", "Precision"),
              ("precision", "Precision-confidence", "Confidence", "Precision"),
              ("recall", "Recall-confidence", "Confidence", "Recall"),
              ("f1", "F1-confidence", "Confidence", "F1"))
    for ax, (key, name, xlabel, ylabel) in zip(fig.subplots(2, 2).flat, panels):
        for label, arrays in curves:
            ax.plot(arrays["px"], arrays[key], linewidth=2, label=label)
        ax.set(title=name, xlabel=xlabel, ylabel=ylabel, xlim=(0, 1), ylim=(0, 1))
        ax.grid(alpha=0.3)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2)
    return _save(fig, path)


def per_epoch(history: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (epochs, values) of a per-epoch metric; an epoch logged twice (a resumed run) keeps its last value."""
    values = {int(row["epoch"]): float(row[key]) for row in history if key in row and "epoch" in row}
    epochs = np.array(sorted(values))
    return epochs, np.array([values[e] for e in epochs])


def loss_curves(title: str, runs: list[tuple[str, list[dict], int]], path: Path) -> Path:
    """Draw train and validation box/obj/cls losses per epoch of several fits (label, history, first epoch's x:
    a fine-tune is drawn after its baseline's epochs) on a 2x3 grid; return the path."""
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    fig.suptitle(title)
    axes = fig.subplots(2, 3)
    for row, stage in enumerate(("train", "val")):
        for col, loss in enumerate(LOSS_NAMES):
            ax = axes[row, col]
            for label, history, offset in runs:
                epochs, values = per_epoch(history, f"{stage}/{loss}")
                ax.plot(epochs + offset, values, marker="." if len(epochs) < 30 else None, label=label)
            ax.set(title=f"{stage}/{loss}", xlabel="epoch (fine-tuning continues the baseline's count)",
                   ylabel="loss")
            ax.grid(alpha=0.3)
    fig.legend(*axes[0, 0].get_legend_handles_labels(), loc="outside lower center", ncols=3)
    return _save(fig, path)


def results_figure(history: list[dict], path: Path) -> Path:
    """Draw one fit's losses (train and validation) and validation scores per epoch on a 2x5 grid, as YOLOv5's
    results.png; return the path."""
    fig = Figure(figsize=(20, 8), layout="constrained")
    panels = [f"train/{loss}" for loss in LOSS_NAMES] + ["val/precision", "val/recall"] \
        + [f"val/{loss}" for loss in LOSS_NAMES] + ["val/mAP50", "val/mAP50-95"]
    for ax, key in zip(fig.subplots(2, 5).flat, panels):
        epochs, values = per_epoch(history, key)
        ax.plot(epochs, values, marker="." if len(epochs) < 30 else None)
        ax.set(title=key, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    return _save(fig, path)


def pareto_front(costs: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """Return the indices of points no other point beats (lower or equal cost with higher score, or lower cost
    with equal score), by increasing cost."""
    order = np.lexsort((-scores, costs))  # by cost, and by score (best first) among equal costs
    front, best = [], -np.inf
    for i in order:
        if scores[i] > best:
            front.append(i)
            best = scores[i]
    return np.array(front, dtype=int)


def tradeoff(points: list[dict], axes_spec: list[tuple[str, str]], path: Path) -> Path:
    """Scatter mAP50-95 against each cost in `axes_spec` (key, axis label) for `points` (dicts with label, model,
    kind, mAP50-95 and the costs), circle and join the Pareto front; return the path."""
    fig = Figure(figsize=(6.5 * len(axes_spec), 6), layout="constrained")
    fig.suptitle("Accuracy against cost (Pareto front: no other model is both cheaper and more accurate)")
    models = sorted({p["model"] for p in points})
    colors = {m: f"C{i}" for i, m in enumerate(models)}
    markers = {"baseline": "o", "pruned, no fine-tuning": "x", "pruned + fine-tuned": "s"}
    for ax, (key, xlabel) in zip(np.atleast_1d(fig.subplots(1, len(axes_spec))), axes_spec):
        usable = [p for p in points if p.get(key) is not None]
        front = pareto_front(np.array([p[key] for p in usable]), np.array([p["mAP50-95"] for p in usable])) \
            if usable else []
        for i, p in enumerate(usable):
            ax.scatter(p[key], p["mAP50-95"], color=colors[p["model"]], marker=markers[p["kind"]], s=60)
            # Collapsed (not fine-tuned) models pile up near zero: their colour and marker say enough unless
            # they are on the front. Below the point, so as not to cover their fine-tuned self at the same cost.
            below = p["kind"] == "pruned, no fine-tuning"
            if not below or i in front:
                ax.annotate(p["label"], (p[key], p["mAP50-95"]), textcoords="offset points",
                            xytext=(5, -12 if below else 5), fontsize=8)
        ax.margins(x=0.12)  # room for the labels of the right-most points
        if usable:
            xs, ys = [usable[i][key] for i in front], [usable[i]["mAP50-95"] for i in front]
            ax.step(xs, ys, where="post", color="black", linestyle="--", linewidth=1)
            ax.scatter(xs, ys, s=220, facecolors="none", edgecolors="black")
        ax.set(xlabel=xlabel, ylabel="mAP50-95")
        ax.grid(alpha=0.3)
    handles = [fig.axes[0].scatter([], [], color=colors[m], marker="o", label=m) for m in models]
    handles += [fig.axes[0].scatter([], [], color="grey", marker=mk, label=k) for k, mk in markers.items()]
    handles += [fig.axes[0].scatter([], [], s=220, facecolors="none", edgecolors="black", label="Pareto front")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
    return _save(fig, path)
