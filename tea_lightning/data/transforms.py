"""Image geometry and augmentation: YOLOv5's letterbox and rectangular shapes, and its training augmentations
built from albumentations (mosaic, scale/translate, HSV, flips)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np

from tea_lightning.errors import ConfigError

PAD_VALUE = 114  # YOLOv5's grey, so padded regions look the same to a model trained by either tool


@dataclass
class Augmentation:
    """Training augmentation strengths; defaults are YOLOv5's `hyp.scratch-low.yaml`.

    Args:
        mosaic: probability of a 4-image mosaic.
        scale: random scaling by a factor in 1 +/- scale.
        translate: random translation by up to this fraction of the image size.
        degrees: random rotation by up to this many degrees.
        shear: random shear by up to this many degrees.
        hsv_h: hue jitter (fraction of the hue circle).
        hsv_s: saturation jitter (fraction).
        hsv_v: value (brightness) jitter (fraction).
        fliplr: probability of a left-right flip.
        flipud: probability of an up-down flip.
        close_mosaic: train the last this many epochs without the mosaic (Ultralytics' `close_mosaic`: the model
            ends on whole images like those it is validated on; YOLOv5 has no such option, hence 0).
    """

    mosaic: float = 1.0
    scale: float = 0.5
    translate: float = 0.1
    degrees: float = 0.0
    shear: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    fliplr: float = 0.5
    flipud: float = 0.0
    close_mosaic: int = 0

    def __post_init__(self) -> None:
        bad = [f"{name} {getattr(self, name)} (a probability: 0 to 1)" for name in ("mosaic", "fliplr", "flipud")
               if not 0 <= getattr(self, name) <= 1]
        # above 1 a gain could fall below 0: a hue turned backwards, colours or brightness clipped to nothing
        bad += [f"{name} {getattr(self, name)} (gains of 1 +/- up to it: 0 to 1)"
                for name in ("hsv_h", "hsv_s", "hsv_v") if not 0 <= getattr(self, name) <= 1]
        bad += [f"{name} {getattr(self, name)} (at least 0)" for name in ("scale", "translate", "degrees", "shear",
                                                                          "close_mosaic")
                if getattr(self, name) < 0]
        if bad:
            raise ConfigError(f"--data.augmentation: {', '.join(bad)}.")


def read_rgb(path: Path) -> np.ndarray:
    """Return an image as an RGB uint8 array, rotated as its EXIF orientation says (cv2 does that by default)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)  # also turns grey and 4-channel images into 3 channels
    if image is None:
        raise OSError(f"cannot read image {path}")
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def resize_longest(image: np.ndarray, size: int, augment: bool) -> np.ndarray:
    """Return the image resized so its longest side is `size`, interpolated as YOLOv5's `load_image` does."""
    h, w = image.shape[:2]
    r = size / max(h, w)
    if r == 1:
        return image
    interpolation = cv2.INTER_LINEAR if (augment or r > 1) else cv2.INTER_AREA
    return cv2.resize(image, (max(1, math.ceil(w * r)), max(1, math.ceil(h * r))), interpolation=interpolation)


def rect_shape(aspects: list[float], img_size: int, stride: int = 32, pad: float = 0.5) -> tuple[int, int]:
    """Return the (height, width) YOLOv5's rectangular validation letterboxes a batch of images with these aspect
    ratios (height / width) into: that of its most extreme one, or a square when the batch holds both tall and wide
    images, the longest side `img_size`, each side rounded up to the stride with `pad` strides to spare."""
    low, high = min(aspects), max(aspects)
    relative = (high, 1.0) if high < 1 else (1.0, 1 / low) if low > 1 else (1.0, 1.0)
    return tuple(int(math.ceil(r * img_size / stride + pad) * stride) for r in relative)


def letterbox(image: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, float, tuple[float, float]]:
    """Return the image scaled down (never up) to fit `shape` and padded around its centre, the scale and the
    (left, top) padding."""
    h, w = image.shape[:2]
    r = min(shape[0] / h, shape[1] / w, 1.0)
    new_w, new_h = round(w * r), round(h * r)
    if (new_w, new_h) != (w, h):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    dw, dh = (shape[1] - new_w) / 2, (shape[0] - new_h) / 2
    # the -0.1/+0.1 split puts the odd pixel where YOLOv5 puts it
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT, value=(PAD_VALUE,) * 3)
    return image, r, (dw, dh)


def _bbox_params() -> A.BboxParams:
    """Return the box handling shared by the training pipelines: YOLO boxes, clipped, dropped as YOLOv5 drops them."""
    # YOLOv5's box_candidates: at least 10% of the box's area left, sides of 2 px or more (YOLOv5: more than 2), and
    # no side more than 20 times the other (the slivers that clipping at a crop's edge leaves)
    return A.BboxParams(format="yolo", label_fields=["class_labels"], min_visibility=0.1, min_width=2,
                        min_height=2, max_accept_ratio=20, clip=True)


def _affine(aug: Augmentation, shift: float = 1.0) -> A.Affine:
    """Return YOLOv5's random_perspective (without perspective) as an albumentations Affine; `shift` is the output's
    side over the input's (YOLOv5 translates by up to `translate` of the output)."""
    translate = aug.translate * shift
    return A.Affine(scale=(1 - aug.scale, 1 + aug.scale), translate_percent=(-translate, translate),
                    rotate=(-aug.degrees, aug.degrees), shear=(-aug.shear, aug.shear), keep_ratio=True,
                    border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE, p=1.0)


def mosaic_canvas(tiles: list[tuple[np.ndarray, np.ndarray]], size: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Return YOLOv5's mosaic of four images (longest side `size`) on a 2size x 2size canvas and their boxes [cls, cx,
    cy, w, h] normalised to it: each image has a corner at a random centre (in the middle half of the canvas), the
    first above and left of it, then above-right, below-left, below-right; what reaches past the canvas is cut.

    By hand because albumentations' Mosaic fits each image into a grid cell (centred, leaving a padding band through
    the mosaic, or cropped) and hands back only a window of the output's size, where YOLOv5 scales and shifts the
    whole canvas before it keeps the window (TrainTransform)."""
    side = 2 * size
    canvas = np.full((side, side, 3), PAD_VALUE, np.uint8)
    yc, xc = (int(v) for v in rng.uniform(size / 2, 3 * size / 2, size=2))
    placed = []
    for i, (image, boxes) in enumerate(tiles):
        h, w = image.shape[:2]
        left, top = (xc - w if i in (0, 2) else xc), (yc - h if i in (0, 1) else yc)
        x0, y0, x1, y1 = max(left, 0), max(top, 0), min(left + w, side), min(top + h, side)
        canvas[y0:y1, x0:x1] = image[y0 - top:y1 - top, x0 - left:x1 - left]
        xyxy = np.stack([(boxes[:, 1] - boxes[:, 3] / 2) * w + left, (boxes[:, 2] - boxes[:, 4] / 2) * h + top,
                         (boxes[:, 1] + boxes[:, 3] / 2) * w + left, (boxes[:, 2] + boxes[:, 4] / 2) * h + top], 1)
        placed.append(np.concatenate([boxes[:, :1], np.clip(xyxy, 0, side)], 1))
    labels = np.concatenate(placed).astype(np.float32).reshape(-1, 5)
    labels = labels[(labels[:, 3] > labels[:, 1]) & (labels[:, 4] > labels[:, 2])]  # not wholly cut off
    (x0, y0, x1, y1) = labels[:, 1:].T / side
    return canvas, np.stack([labels[:, 0], (x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0], 1)


class HSVGains(A.ImageOnlyTransform):
    """YOLOv5's HSV augmentation: hue, saturation and value each multiplied by a random gain in 1 +/- its limit.

    By hand because albumentations' colour transforms (ColorJitter, HueSaturationValue) add a hue angle: at
    YOLOv5's hsv_h that moves green, the colour of tea shoots, about three times as far as YOLOv5's gain does.
    """

    def __init__(self, hue: float, saturation: float, value: float, p: float = 1.0):
        super().__init__(p=p)
        self.hue, self.saturation, self.value = hue, saturation, value

    @property
    def limits(self) -> tuple[float, float, float]:
        return self.hue, self.saturation, self.value

    def get_transform_init_args_names(self) -> tuple[str, ...]:
        return ("hue", "saturation", "value")

    def get_params(self) -> dict:
        return {"gains": [1 + self.py_random.uniform(-limit, limit) for limit in self.limits]}

    def apply(self, img: np.ndarray, gains: list[float], **params) -> np.ndarray:
        if not any(self.limits):  # the round trip through HSV is not lossless
            return img
        x = np.arange(256, dtype=np.float64)  # lookup tables, as YOLOv5 builds them (hue in OpenCV's 0-180)
        tables = ((x * gains[0]) % 180, np.clip(x * gains[1], 0, 255), np.clip(x * gains[2], 0, 255))
        channels = cv2.split(cv2.cvtColor(img, cv2.COLOR_RGB2HSV))
        hsv = cv2.merge([cv2.LUT(c, t.astype(np.uint8)) for c, t in zip(channels, tables)])
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


class TrainTransform:
    """YOLOv5's training augmentation: mosaic of four images (or one letterboxed image), random scale and
    translation, HSV jitter and flips; outputs a square `img_size` image with YOLO boxes."""

    def __init__(self, img_size: int, aug: Augmentation):
        self.img_size, self.aug = img_size, aug
        s = img_size
        self._rng = np.random.default_rng()  # the mosaic's centre; reseed() gives each loader process its own
        # YOLOv5 scales and shifts the whole 2s x 2s mosaic (mosaic_canvas) about its centre and keeps the central
        # s x s window: zoomed out or shifted, the window shows more mosaic, not padding.
        self.mosaic = A.Compose([_affine(aug, shift=0.5), A.CenterCrop(s, s)], bbox_params=_bbox_params())
        self.single = A.Compose([
            A.LongestMaxSize(max_size=s),
            A.PadIfNeeded(s, s, border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE),
            _affine(aug),
        ], bbox_params=_bbox_params())
        self.photometric = A.Compose([
            HSVGains(aug.hsv_h, aug.hsv_s, aug.hsv_v),
            A.HorizontalFlip(p=aug.fliplr),
            A.VerticalFlip(p=aug.flipud),
        ], bbox_params=_bbox_params())

    def reseed(self, seed: int) -> None:
        """Give the albumentations pipelines their own random generators."""
        # one stream each: with one seed, the affine's scale and the HSV gains would be the same draws
        seeds = np.random.SeedSequence(seed).generate_state(4)
        for pipeline, own in zip((self.mosaic, self.single, self.photometric), seeds):
            pipeline.set_random_seed(int(own))
        self._rng = np.random.default_rng(seeds[3])

    def __call__(self, image: np.ndarray, boxes: np.ndarray,
                 others: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
        """Return the augmented image and its boxes [cls, cx, cy, w, h]: a mosaic with the three `others`, or the
        image alone when there are none (the caller draws the mosaic probability, so that it loads them only when
        they are used)."""
        if others:
            canvas, labels = mosaic_canvas([(image, boxes), *others], self.img_size, self._rng)
            out = self.mosaic(image=canvas, bboxes=labels[:, 1:], class_labels=labels[:, 0])
        else:
            out = self.single(image=image, bboxes=boxes[:, 1:], class_labels=boxes[:, 0])
        out = self.photometric(image=out["image"], bboxes=out["bboxes"], class_labels=out["class_labels"])
        labels = np.concatenate([np.asarray(out["class_labels"], np.float32).reshape(-1, 1),
                                 np.asarray(out["bboxes"], np.float32).reshape(-1, 4)], axis=1)
        return out["image"], labels
