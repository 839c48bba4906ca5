"""Benchmark (docs/benchmarks.md "The training mosaic with YOLOv5's geometry"): training samples of YOLOv5 7.0.14's
own loader (`LoadImagesAndLabels(augment=True)` with hyp.scratch-low) beside tea-lightning's `TrainDataset` on the
same images: boxes per sample, median box area, the share of padding pixels (PAD_VALUE on every channel) and the
time a sample takes (read, resized, augmented), with HSV jitter off so that padding stays exactly grey. A mosaic
that pads where YOLOv5 shows more images gives fewer boxes and more grey.

    python scripts/augmentation_parity.py ../shared/data/tea_shoots/data.yaml --img 416 --samples 300

With --hsv both loaders also apply their HSV gains (hyp.scratch-low's), for the time a whole sample takes; the value
gain then changes the grey, so the padding share undercounts.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tea_lightning.data.datamodule import YoloDataModule  # noqa: E402
from tea_lightning.data.dataset import TrainDataset  # noqa: E402
from tea_lightning.data.transforms import PAD_VALUE, Augmentation  # noqa: E402


def statistics(fetch, picks: list[int]) -> tuple[float, float, float, float]:
    """Return boxes per sample, the median box area (share of the image), the padding share of the pixels and the
    milliseconds per sample of `fetch(index)`, which returns a (CHW uint8 image, [cls, cx, cy, w, h] labels) pair."""
    boxes, areas, padding, seconds = [], [], [], 0.0
    for index in picks:
        start = time.perf_counter()
        image, labels = fetch(index)
        seconds += time.perf_counter() - start
        boxes.append(len(labels))
        areas.extend(labels[:, 3] * labels[:, 4])
        padding.append((image == PAD_VALUE).all(0).mean())
    return float(np.mean(boxes)), float(np.median(areas)), float(np.mean(padding)), 1000 * seconds / len(picks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help="a YOLO data.yaml")
    parser.add_argument("--img", type=int, default=416)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--hsv", action="store_true", help="apply the HSV gains too (time of a whole sample)")
    options = parser.parse_args()
    os.environ.setdefault("YOLOv5_VERBOSE", "false")
    import yolov5
    from yolov5.utils.dataloaders import LoadImagesAndLabels

    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    hyp = yaml.safe_load((Path(yolov5.__file__).parent / "data" / "hyps" / "hyp.scratch-low.yaml").read_text())
    colour = {} if options.hsv else {"hsv_h": 0, "hsv_s": 0, "hsv_v": 0}
    hyp.update(colour)
    module = YoloDataModule(str(options.data), img_size=options.img, batch_size=4, workers=0)
    records = module.split("train").records
    described = yaml.safe_load(options.data.read_text())
    root = options.data.parent / described.get("path", ".")
    train = [str(root / p) for p in np.atleast_1d(described["train"])]  # the folders or lists YOLOv5 reads
    reference = LoadImagesAndLabels(train, img_size=options.img, batch_size=4, augment=True, hyp=hyp)
    ours = TrainDataset(records, options.img, Augmentation(**colour))
    picks = [i % len(records) for i in range(options.samples)]

    def yolov5_sample(index: int):
        image, labels, *_ = reference[index]
        return image.numpy(), labels[:, 1:].numpy()  # YOLOv5's first label column is the image's batch index

    def our_sample(index: int):
        sample = ours[index]
        return sample.image.numpy(), sample.labels.numpy()

    rows = [("YOLOv5 7.0.14 LoadImagesAndLabels", statistics(yolov5_sample, picks)),
            ("tea-lightning TrainDataset", statistics(our_sample, picks))]
    print(f"{options.data} at {options.img}, {options.samples} training samples, "
          f"HSV gains {'on' if options.hsv else 'off'}, {torch.get_num_threads()} threads\n"
          "| loader | boxes per sample | median box area | padding share | ms per sample |\n|---|---|---|---|---|")
    for name, (boxes, area, padding, ms) in rows:
        print(f"| {name} | {boxes:.2f} | {area:.4f} | {padding:.1%} | {ms:.1f} |")


if __name__ == "__main__":
    main()
