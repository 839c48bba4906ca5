"""Synthetic tea-bud-like detection data in YOLO format, so demos and tests run without downloading data."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import cv2
import numpy as np

from tea_lightning.errors import ConfigError

CLASS_NAMES = ("bud", "leaf", "class_2", "class_3")
# BGR fill colours, chosen far apart from each other and from the brown/olive background.
_COLOURS = ((110, 235, 170), (30, 125, 20), (225, 210, 245), (75, 30, 150))
_SOIL, _FOLIAGE = np.array([45.0, 70.0, 100.0]), np.array([45.0, 105.0, 80.0])
# Longest side of each class's shape as a fraction of the image side (about 6%..25% overall).
_SIZES = ((0.06, 0.14), (0.12, 0.25), (0.08, 0.18), (0.06, 0.12))
_BACKGROUND_FRACTION = 0.1
_MAX_OVERLAP_IOU = 0.2
_JPEG_QUALITY = 90
_SUPERSAMPLE = 4  # objects are drawn at 4x and area-averaged down, for anti-aliasing
_SHIFT = 4  # cv2 sub-pixel bits, so vertices keep 1/16 px precision in the 4x render


def _shape(rng: np.random.Generator, cls: int) -> np.ndarray:
    """Return the (n, 2) outline of a class's shape, centred at the origin, long axis 1."""
    if cls == 2:  # star (flower-like); 2 vertices per tip keeps it at 10..16 points
        tips = int(rng.integers(5, 9))
        t = np.linspace(0, 2 * np.pi, 2 * tips, endpoint=False)
        r = np.where(np.arange(2 * tips) % 2 == 0, 0.5, 0.22)
        return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)
    n = int(rng.integers(8, 17))
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    if cls == 0:  # teardrop: pointed tip at t=0, rounded base at t=pi
        y = rng.uniform(0.35, 0.5) * np.sin(t) * np.sin(t / 2)
    elif cls == 1:  # lens-shaped leaf, pointed at both ends
        y = rng.uniform(0.17, 0.25) * np.sin(t) * np.sqrt(np.abs(np.sin(t)))
    else:  # round berry with a slightly irregular rim
        return 0.5 * rng.uniform(0.9, 1.0, n)[:, None] * np.stack([np.cos(t), np.sin(t)], axis=1)
    return np.stack([0.5 * np.cos(t), y], axis=1)


def _place(rng: np.random.Generator, cls: int, size: int, boxes: list[np.ndarray]) -> np.ndarray | None:
    """Return a random pixel-coordinate polygon of the class inside the image, or None if it overlaps boxes too much."""
    angle = rng.uniform(0, 2 * np.pi)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    poly = _shape(rng, cls) @ rot.T * (rng.uniform(*_SIZES[cls]) * size)
    lo, hi = poly.min(0), poly.max(0)
    poly = poly - lo + rng.uniform(0, size - 1 - (hi - lo))
    box = np.concatenate([poly.min(0), poly.max(0)])
    if any(_iou(box, other) > _MAX_OVERLAP_IOU for other in boxes):
        return None
    boxes.append(box)  # later objects may only overlap this one lightly
    return poly


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    """Return the intersection over union of two (x0, y0, x1, y1) boxes."""
    inter = np.prod(np.clip(np.minimum(a[2:], b[2:]) - np.maximum(a[:2], b[:2]), 0, None))
    union = np.prod(a[2:] - a[:2]) + np.prod(b[2:] - b[:2]) - inter
    return float(inter / (union + 1e-9))


def _draw_object(image: np.ndarray, cls: int, poly: np.ndarray, rng: np.random.Generator) -> None:
    """Blend the anti-aliased object into the float image in place, with no pixel outside the polygon."""
    colour = tuple(int(c) for c in np.clip(np.array(_COLOURS[cls]) + rng.integers(-15, 16, 3), 0, 255))
    k = _SUPERSAMPLE
    x0, y0 = np.floor(poly.min(0)).astype(int)
    x1, y1 = np.ceil(poly.max(0)).astype(int) + 1

    def fixed(p: np.ndarray) -> np.ndarray:
        # cv2 puts pixel centres at integers, so points go through the pixel edge at -0.5 to keep their place at k x
        return np.round(((np.asarray(p) - (x0, y0) + 0.5) * k - 0.5) * (1 << _SHIFT)).astype(np.int32)

    paint = np.zeros(((y1 - y0) * k, (x1 - x0) * k, 3), np.uint8)
    cover = np.zeros(paint.shape[:2], np.uint8)
    cv2.fillPoly(paint, [fixed(poly)], colour, cv2.LINE_8, _SHIFT)
    cv2.fillPoly(cover, [fixed(poly)], 255, cv2.LINE_8, _SHIFT)
    centre = poly.mean(0)
    if cls == 1:  # pale midrib between the two tips, the leaf's most telling feature
        tips = poly[[0, len(poly) // 2]]
        ends = centre + 0.8 * (tips - centre)
        thickness = k * max(1, round(np.linalg.norm(tips[0] - tips[1]) / 40))
        cv2.line(paint, tuple(fixed(ends[0])), tuple(fixed(ends[1])), (120, 200, 150), thickness, cv2.LINE_8, _SHIFT)
    elif cls == 3:  # specular highlight makes the berry read as round and glossy
        radius = 0.15 * np.ptp(poly[:, 0])
        spot = centre - 0.3 * radius
        cv2.circle(paint, tuple(fixed(spot)), int(radius * k * (1 << _SHIFT)), (190, 170, 230), -1, cv2.LINE_8, _SHIFT)
    paint[cover == 0] = 0  # no detail may leave the outline, or the label box would no longer enclose it

    def small(a: np.ndarray) -> np.ndarray:
        # area-averaging the fine render gives each edge pixel its exact coverage; cv2.LINE_AA would bleed ~1 px
        return cv2.resize(a, (x1 - x0, y1 - y0), interpolation=cv2.INTER_AREA).astype(np.float32)

    region = image[y0:y1, x0:x1]
    region *= 1 - small(cover)[..., None] / 255
    region += small(paint)  # paint is black outside the outline, so it is already weighted by coverage


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Return a float BGR image of blurred soil/foliage blobs, all between brown and olive so no blob mimics a class."""

    def shade() -> np.ndarray:
        return _SOIL + rng.uniform(0, 1) * (_FOLIAGE - _SOIL)

    image = np.full((size, size, 3), shade(), np.float32)
    for _ in range(25):
        centre = tuple(int(v) for v in rng.integers(0, size, 2))
        axes = tuple(int(v) for v in rng.integers(size // 20, size // 6 + 1, 2))
        colour = tuple(float(c) for c in shade() * rng.uniform(0.6, 1.3))
        cv2.ellipse(image, centre, axes, float(rng.uniform(0, 180)), 0, 360, colour, -1)
    return cv2.GaussianBlur(image, (0, 0), size / 40)


def _render(rng: np.random.Generator, size: int, num_classes: int, n_objects: int) -> tuple[np.ndarray, list]:
    """Return a uint8 BGR image and its objects as (class id, pixel-coordinate polygon) pairs."""
    image = _background(rng, size)
    boxes: list[np.ndarray] = []
    objects = []
    for _ in range(n_objects):
        cls = int(rng.integers(num_classes))
        # a few placement attempts; giving up just leaves the image with fewer objects
        for _ in range(10):
            poly = _place(rng, cls, size, boxes)
            if poly is not None:
                _draw_object(image, cls, poly, rng)
                objects.append((cls, poly))
                break
    # per-image brightness is what makes photometric augmentation worth having
    image = image * rng.uniform(0.6, 1.35) + rng.normal(0, 6, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _label_line(cls: int, poly: np.ndarray, size: int, label_format: str) -> str:
    """Return a YOLO label line for the polygon, normalised to [0, 1] with 6 decimals."""
    # cv2 puts pixel centres at integers while YOLO puts pixel i on [i, i + 1), hence the half pixel
    norm = np.clip((poly + 0.5) / size, 0, 1)
    if label_format == "box":
        lo, hi = norm.min(0), norm.max(0)
        values = [*(lo + hi) / 2, *(hi - lo)]
    else:
        values = norm.ravel().tolist()
    return f"{cls} " + " ".join(f"{v:.6f}" for v in values)


def _check(name: str, value: int, lo: int, hi: int | None = None) -> None:
    """Raise ConfigError (a ValueError) naming the argument unless value is an integer in [lo, hi]."""
    if not isinstance(value, (int, np.integer)) or value < lo or (hi is not None and value > hi):
        upper = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(f"{name} must be an integer >= {lo}{upper}, got {value!r}")


def make_synthetic_dataset(
    root: str | Path,
    n_train: int = 64,
    n_val: int = 16,
    image_size: int = 256,
    num_classes: int = 2,
    max_objects: int = 6,
    label_format: Literal["polygon", "box"] = "polygon",
    seed: int = 0,
) -> Path:
    """Return the path of data.yaml of a freshly written synthetic YOLO data set under root."""
    _check("n_train", n_train, 1)
    _check("n_val", n_val, 1)
    _check("image_size", image_size, 64)
    _check("num_classes", num_classes, 1, len(CLASS_NAMES))
    _check("max_objects", max_objects, 1)
    _check("seed", seed, 0)
    if label_format not in ("polygon", "box"):
        raise ConfigError(f"label_format must be 'polygon' or 'box', got {label_format!r}")
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file: give a folder to write the data set to.")
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("val", n_val)):
        image_dir, label_dir = root / "images" / split, root / "labels" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        # a stale label from an earlier run would turn one of this run's background images into a labelled one
        stale = [*image_dir.glob(f"{split}_*.jpg"), *label_dir.glob(f"{split}_*.txt"), label_dir.with_suffix(".cache")]
        for path in stale:
            path.unlink(missing_ok=True)
        background = set(rng.choice(n, round(n * _BACKGROUND_FRACTION), replace=False).tolist())
        for i in range(n):
            n_objects = 0 if i in background else int(rng.integers(1, max_objects + 1))
            image, objects = _render(rng, image_size, num_classes, n_objects)
            cv2.imwrite(str(image_dir / f"{split}_{i:04d}.jpg"), image, [cv2.IMWRITE_JPEG_QUALITY, _JPEG_QUALITY])
            if objects:  # YOLO reads a missing label file as a background image, as in its own exports
                lines = [_label_line(cls, poly, image_size, label_format) for cls, poly in objects]
                (label_dir / f"{split}_{i:04d}.txt").write_text("\n".join(lines) + "\n")
    names = ", ".join(f"'{name}'" for name in CLASS_NAMES[:num_classes])
    yaml_path = root / "data.yaml"
    yaml_path.write_text(
        f"# Synthetic tea-bud-like data set, not real photos: tea_lightning.data.synthetic, seed {seed}.\n"
        "# Paths are relative to this file's folder.\n"
        f"train: images/train\nval: images/val\nnc: {num_classes}\nnames: [{names}]\n"
    )
    return yaml_path
