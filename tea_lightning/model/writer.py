"""Writes what `predict` finds: each image with its boxes drawn, and a YOLO-format text file per image."""

from __future__ import annotations

import warnings
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import torch
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info

from tea_lightning.data.transforms import read_rgb
from tea_lightning.rundir import run_dir

# Distinct colours (BGR) for up to ten classes, then they repeat.
PALETTE = [(56, 56, 255), (151, 157, 255), (31, 112, 255), (29, 178, 255), (49, 210, 207), (10, 249, 72),
           (23, 204, 146), (134, 219, 61), (211, 188, 0), (255, 115, 100)]


class DetectionWriter(BasePredictionWriter):
    """Saves `<output_dir>/images/<name>` (the image's own file name) with boxes and `<output_dir>/labels/<stem>.txt`
    (`cls cx cy w h`, normalised, plus the confidence with `save_conf`) for the detections `predict` returns (those
    at or above `--model.predict_conf_thres`). Images in subfolders of `--data.predict_source` keep their
    subfolders, so that same-named images of different folders (cameras, days) do not overwrite each other's
    outputs; of images that differ only in their extension (`a.jpg`, `a.png`), the second's labels go to
    `a_png.txt`, with a warning (checked within each process).

    Args:
        output_dir: where images/ and labels/ go (default: the run folder's predictions/).
        save_conf: also write each box's confidence at the end of its label line (YOLOv5's --save-conf).
    """

    def __init__(self, output_dir: str | None = None, save_conf: bool = False):
        super().__init__(write_interval="batch")
        self.output_dir, self.save_conf = output_dir, save_conf
        self._label_sources: dict[Path, Path] = {}  # label file -> the image it was written for, this run
        self._images = 0
        self._boxes: Counter[int] = Counter()  # per class

    def on_predict_start(self, trainer, pl_module) -> None:
        self._label_sources, self._images, self._boxes = {}, 0, Counter()

    def _root(self, trainer) -> Path:
        return Path(self.output_dir or run_dir(trainer) / "predictions")

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx=0) -> None:
        root = self._root(trainer)
        source = getattr(trainer.datamodule, "predict_source", None)
        folder = Path(source) if source and Path(source).is_dir() else None
        names = pl_module.names
        for item in prediction:
            det = item["detections"].numpy()
            path = Path(item["path"])
            height, width = item["original_shape"]
            name = path.relative_to(folder) if folder else Path(path.name)
            label, image = self._label_path(root, name, path), root / "images" / name
            for output in (label.parent, image.parent):
                output.mkdir(parents=True, exist_ok=True)
            label.write_text(self._label_lines(det, width, height))
            cv2.imwrite(str(image), self._draw(path, det, names))
            self._images += 1
            self._boxes.update(int(cls) for cls in det[:, 5])

    def _label_path(self, root: Path, name: Path, source: Path) -> Path:
        label = root / "labels" / name.with_suffix(".txt")
        if self._label_sources.setdefault(label, source) != source:
            first = self._label_sources[label]
            label = label.with_name(f"{name.stem}_{name.suffix.lstrip('.')}.txt")
            warnings.warn(f"{first} and {source} share the label name {name.with_suffix('.txt')}: the labels of "
                          f"{source.name} are written to {label.name}.", stacklevel=2)
            self._label_sources[label] = source
        return label

    def on_predict_end(self, trainer, pl_module) -> None:
        names = pl_module.names
        counts = torch.tensor([self._images, *(self._boxes[c] for c in range(len(names)))], device=pl_module.device)
        counts = trainer.strategy.reduce(counts, reduce_op="sum").tolist()  # every process's images
        found = ", ".join(f"{n} {names[c]}" for c, n in enumerate(counts[1:]) if n)
        rank_zero_info(f"Predicted {counts[0]} image(s): {sum(counts[1:])} box(es)"
                       f"{f' ({found})' if found else ''} at confidence >= {pl_module.hparams.predict_conf_thres}; "
                       f"images and labels written to {self._root(trainer)}")

    def _label_lines(self, det: np.ndarray, width: int, height: int) -> str:
        lines = []
        for x1, y1, x2, y2, conf, cls in det:
            values = [(x1 + x2) / 2 / width, (y1 + y2) / 2 / height, (x2 - x1) / width, (y2 - y1) / height]
            line = f"{int(cls)} " + " ".join(f"{v:.6f}" for v in values)
            lines.append(line + (f" {conf:.4f}" if self.save_conf else ""))
        return "\n".join(lines) + ("\n" if lines else "")

    @staticmethod
    def _draw(path: Path, det: np.ndarray, names: list[str]) -> np.ndarray:
        image = cv2.cvtColor(read_rgb(path), cv2.COLOR_RGB2BGR)
        # YOLOv5's Annotator: lines 0.3% of the mean side, and at least 2 px, which keeps the labels of images under
        # about 600 px readable (at 1 px the text is some 9 px tall)
        thickness = max(2, round(sum(image.shape[:2]) / 2 * 0.003))
        for x1, y1, x2, y2, conf, cls in det:
            colour = PALETTE[int(cls) % len(PALETTE)]
            p1, p2 = (int(x1), int(y1)), (int(x2), int(y2))
            cv2.rectangle(image, p1, p2, colour, thickness, cv2.LINE_AA)
            label = f"{names[int(cls)]} {conf:.2f}"
            scale = thickness / 3
            (w, h), _ = cv2.getTextSize(label, cv2.FONT_HERSHEY_SIMPLEX, scale, max(thickness - 1, 1))
            above = p1[1] - h - 3 >= 0  # else (a box at the image's top edge) the tag goes inside the box
            tag_edge, baseline = (p1[1] - h - 3, p1[1] - 2) if above else (p1[1] + h + 3, p1[1] + h + 1)
            cv2.rectangle(image, (p1[0], tag_edge), (p1[0] + w, p1[1]), colour, -1, cv2.LINE_AA)
            cv2.putText(image, label, (p1[0], baseline), cv2.FONT_HERSHEY_SIMPLEX, scale,
                        (255, 255, 255), max(thickness - 1, 1), cv2.LINE_AA)
        return image
