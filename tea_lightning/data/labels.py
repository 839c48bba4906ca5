"""Read YOLO data sets: `data.yaml`, image lists and label files (boxes or polygons), with a problem report."""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from tea_lightning.data.transforms import read_rgb
from tea_lightning.errors import UserError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
CACHE_VERSION = 6
# YOLOv5 skips images under 10 pixels a side as corrupt: too small to hold an object at any stride.
MIN_IMAGE_SIDE = 10
# Labelling tools write 0.9999999 or 1.0000001; anything further outside [0, 1] is a real labelling error.
COORD_TOLERANCE = 1e-5
MIN_BOX_SIDE = 1e-6  # normalised; well above float32's resolution in [0, 1]
DUPLICATE_ROW = "duplicate row, dropped"  # the one row problem that keeps its image: the object is still labelled


class DataError(UserError, ValueError):
    """A data set that cannot be used; the message names the file and what to do."""


@dataclass(frozen=True)
class DataSpec:
    """What a `data.yaml` says: image sources per split and the class names."""

    yaml_path: Path
    splits: dict[str, list[Path]]
    names: list[str]

    @property
    def nc(self) -> int:
        """Return the number of classes."""
        return len(self.names)


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a data set, with the file (and line) it was found in."""

    path: Path
    message: str
    line: int | None = None

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.message}"


@dataclass
class ImageRecord:
    """An image that passed the checks, its size after EXIF rotation and its boxes [cls, cx, cy, w, h] (normalised)."""

    image: Path
    height: int
    width: int
    boxes: np.ndarray  # (n, 5) float32
    label_format: str  # "box", "polygon", "mixed" or "none"


@dataclass
class SplitIndex:
    """The usable images of one split and every problem found while reading it."""

    records: list[ImageRecord]
    problems: list[Problem] = field(default_factory=list)
    unlabelled: int = 0  # usable images without a label file (background, or labels not where YOLO looks)

    def instances_per_class(self, nc: int) -> np.ndarray:
        """Return the number of boxes of each class."""
        classes = [r.boxes[:, 0].astype(int) for r in self.records if len(r.boxes)]
        return np.bincount(np.concatenate(classes), minlength=nc) if classes else np.zeros(nc, dtype=int)

    def summary(self, split: str, names: list[str]) -> str:
        """Return a few human-readable lines: image, instance and problem counts."""
        counts = self.instances_per_class(len(names))
        background = sum(1 for r in self.records if len(r.boxes) == 0)
        formats = sorted({r.label_format for r in self.records} - {"none"}) or ["none"]
        lines = [
            f"{split}: {len(self.records)} images ({background} background), {int(counts.sum())} instances, "
            f"labels as {'/'.join(formats)}",
            "  per class: " + ", ".join(f"{n}={c}" for n, c in zip(names, counts)),
        ]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s) skipped:")
            lines += [f"    {p}" for p in self.problems[:20]]
            if len(self.problems) > 20:
                lines.append(f"    ... and {len(self.problems) - 20} more")
        return "\n".join(lines)


def read_data_yaml(path: str | Path) -> DataSpec:
    """Return the splits and names of a YOLO `data.yaml`; paths are relative to its folder or to `path:`."""
    yaml_path = Path(os.path.abspath(Path(path).expanduser()))
    if yaml_path.is_dir():
        inside = sorted(yaml_path.glob("*.yaml"))
        hint = f" ({', '.join(p.name for p in inside)} there)" if inside else ""
        raise DataError(f"data yaml {yaml_path} is a folder: pass the path of its YOLO data.yaml{hint}.")
    if not yaml_path.is_file():
        raise DataError(f"data yaml {yaml_path} does not exist: pass the path of a YOLO data.yaml (--data.data_yaml).")
    try:
        content = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as err:
        raise DataError(f"{yaml_path} is not valid YAML: {err}") from err
    if not isinstance(content, dict):
        raise DataError(f"{yaml_path} must be a mapping with keys train, val and names.")
    missing = [key for key in ("train", "val", "names") if key not in content]
    if missing:
        raise DataError(f"{yaml_path} lacks {', '.join(missing)}: a YOLO data.yaml needs train, val and names.")
    names = content["names"]
    if isinstance(names, dict):  # YOLOv5 also accepts {0: name, 1: name}
        names = [names[k] for k in sorted(names)]
    if not isinstance(names, list) or not names:
        raise DataError(f"{yaml_path}: names must be a list of class names (names: [bud, leaf]) or a mapping from "
                        f"class id to name, got {content['names']!r}.")
    names = [str(n) for n in names]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:  # they name the per-class metrics and plots, which would mix the classes up
        raise DataError(f"{yaml_path}: names lists {', '.join(map(repr, repeated))} more than once; give every class "
                        "its own name.")
    if "nc" in content and str(content["nc"]) != str(len(names)):
        raise DataError(f"{yaml_path}: nc is {content['nc']} but names lists {len(names)} classes; make them agree.")
    # Absolute paths without resolving symbolic links: a linked images folder must keep its `images` name, which
    # tells where the labels are.
    base = yaml_path.parent
    if content.get("path"):
        base = Path(os.path.abspath(base / Path(content["path"]).expanduser()))
    splits = {}
    for split in ("train", "val", "test"):
        if content.get(split):
            sources = content[split] if isinstance(content[split], list) else [content[split]]
            splits[split] = [_split_source(base, str(s)) for s in sources]
    return DataSpec(yaml_path=yaml_path, splits=splits, names=names)


def _split_source(base: Path, source: str) -> Path:
    """Return the absolute path of one split source of a data.yaml whose paths are relative to `base`.

    Roboflow's YOLOv5 export writes `train: ../train/images` beside `train/`, `valid/` in one folder; YOLOv5's
    check_dataset reads such a path without its `../` when it does not exist as written, and so does this.
    """
    path = Path(os.path.abspath(base / Path(source).expanduser()))
    if not path.exists() and source.startswith("../"):
        beside = Path(os.path.abspath(base / source[3:]))
        if beside.exists():
            return beside
    return path


def list_images(sources: list[Path], yaml_path: Path) -> list[Path]:
    """Return the image files of a split: folders are searched recursively, .txt files list one image per line."""
    images: list[Path] = []
    for source in sources:
        if source.is_dir():
            images += sorted(p for p in source.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif source.is_file() and source.suffix == ".txt":
            lines = [line.strip() for line in source.read_text().splitlines() if line.strip()]
            images += [Path(os.path.abspath(source.parent / line)) for line in lines]
        elif source.is_file():
            raise DataError(f"{source} (from {yaml_path}) is a file but not a .txt list of images: give a folder of "
                            "images or a .txt file with one image path per line.")
        else:
            raise DataError(f"{source} (from {yaml_path}) does not exist: fix the path in the yaml.")
    return images


def label_path_for(image: Path) -> Path:
    """Return the label file YOLO expects for an image: the last `images` folder becomes `labels`, suffix .txt."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    return Path(*parts).with_suffix(".txt")


def parse_label_file(path: Path, nc: int) -> tuple[np.ndarray, str, list[Problem]]:
    """Return the usable rows of a label file as [cls, cx, cy, w, h], their format and the problems found."""
    rows, formats, problems, seen = [], set(), [], set()
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        row, fmt, message = _parse_label_line(line.split(), nc)
        if message:
            problems.append(Problem(path, message, number))
            continue
        key = tuple(np.round(row, 6))
        if key in seen:
            problems.append(Problem(path, DUPLICATE_ROW, number))
            continue
        seen.add(key)
        rows.append(row)
        formats.add(fmt)
    boxes = np.array(rows, dtype=np.float32).reshape(-1, 5)
    label_format = formats.pop() if len(formats) == 1 else ("mixed" if formats else "none")
    return boxes, label_format, problems


def _parse_label_line(values: list[str], nc: int) -> tuple[np.ndarray | None, str, str | None]:
    """Return one row as [cls, cx, cy, w, h] with its format, or a message saying why it is unusable."""
    n = len(values)
    if n != 5 and (n < 7 or n % 2 == 0):
        return None, "", (
            f"{n} values: a box row has 5 (class cx cy w h), a polygon row an odd count of at least 7 "
            "(class x1 y1 ... xn yn)"
        )
    try:
        numbers = np.array([float(v) for v in values], dtype=np.float64)
    except ValueError:
        return None, "", "non-numeric value"
    if not np.isfinite(numbers).all():
        return None, "", "non-finite value"
    cls = numbers[0]
    if cls != int(cls) or cls < 0 or cls >= nc:
        return None, "", f"class id {values[0]} is not an integer in [0, {nc - 1}] (nc={nc} in data.yaml)"
    coords = numbers[1:]
    fmt, box = ("box", coords) if n == 5 else ("polygon", _polygon_box(coords))
    # YOLOv5's check is on the box, so a polygon may reach past the image edge (labelling tools let points be
    # dragged over it) as long as its box's centre and size are normalised; pixel coordinates are far outside.
    if (box < -COORD_TOLERANCE).any() or (box > 1 + COORD_TOLERANCE).any():
        return None, "", "coordinates outside [0, 1]: YOLO labels are normalised by the image width and height"
    if fmt == "polygon":  # the object is cut at the image edge: the box of its visible part
        box = _polygon_box(coords.clip(0, 1))
    cx, cy, w, h = box.clip(0, 1)
    if w < MIN_BOX_SIDE or h < MIN_BOX_SIDE:  # float32 boxes narrower than this would have x_min == x_max
        return None, "", f"zero-size box (under {MIN_BOX_SIDE:g} of the image wide or high)"
    return np.array([cls, cx, cy, w, h]), fmt, None


def _polygon_box(coords: np.ndarray) -> np.ndarray:
    """Return [cx, cy, w, h] of the box around polygon points [x1, y1, ..., xn, yn]."""
    xs, ys = coords[0::2], coords[1::2]
    return np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2, xs.max() - xs.min(), ys.max() - ys.min()])


def read_image_size(path: Path) -> tuple[int, int]:
    """Return (height, width) of an image as the loaders see it (after its EXIF rotation); raise if unreadable.

    Two full decodes, once per data set (the scan is cached): PIL's, because unlike OpenCV it rejects truncated
    files, and then the loaders' own (OpenCV), whose size is the one labels must fit; the two disagree on some
    files' orientation (TIFF, orientation stored only in XMP), and some files only PIL can read.
    """
    with _pil_open(path) as image:
        image.load()
    return read_rgb(path).shape[:2]


def _pil_open(path: Path) -> Image.Image:
    """Pillow's own Image.open. The yolov5 package imports ultralytics, which replaces Image.open with one that, on a
    file Pillow cannot identify, tries to pip-install pi-heif and then fails with "No module named 'pi_heif'"
    instead of "cannot identify image file"; ultralytics keeps the original as `_image_open`."""
    patches = sys.modules.get("ultralytics.utils.patches")
    return getattr(patches, "_image_open", Image.open)(path)


def orphan_labels(images: list[Path]) -> list[Path]:
    """Return the label files in the images' label folders that belong to no image file (often a renamed image).

    Any image beside the split's counts, not only the split's own: splits given as .txt lists share one folder.
    A label folder that is the image folder itself (no `images/` in the path) holds other .txt files too (such
    lists): it is not searched.
    """
    folders = {label_path_for(image).parent: image.parent for image in images}
    orphans = []
    for label_folder, image_folder in folders.items():
        if label_folder == image_folder or not label_folder.is_dir():
            continue
        stems = {path.stem for path in image_folder.iterdir() if path.suffix.lower() in IMAGE_SUFFIXES}
        orphans += [label for label in label_folder.glob("*.txt") if label.stem not in stems]
    return sorted(orphans)


def scan_split(images: list[Path], nc: int, orphans: list[Path]) -> SplitIndex:
    """Return the usable images of a split with their boxes; unreadable or tiny images, images with bad label rows,
    those rows and the label files without an image (`orphans`, from orphan_labels) become problems."""
    records, unlabelled = [], 0
    problems = [Problem(label, "label file without an image, ignored") for label in orphans]
    for image in images:
        try:
            height, width = read_image_size(image)
        except Exception as err:  # PIL raises many types for corrupt files; each becomes a reported problem
            problems.append(Problem(image, f"unreadable image, skipped ({type(err).__name__}: {err})"))
            continue
        if min(height, width) < MIN_IMAGE_SIDE:
            problems.append(Problem(image, f"image is {width}x{height} pixels, under {MIN_IMAGE_SIDE} a side: "
                                           "skipped"))
            continue
        label = label_path_for(image)
        if label.is_file():
            boxes, label_format, label_problems = parse_label_file(label, nc)
            problems += label_problems
            bad_rows = sum(problem.message != DUPLICATE_ROW for problem in label_problems)
            if bad_rows:
                # The objects of the bad rows are in the image all the same: training on it would teach the model
                # that they are background (YOLOv5 drops such an image too).
                problems.append(Problem(image, f"skipped: {bad_rows} bad row(s) in {label.name} (above); fix them "
                                               "to train on this image"))
                continue
        else:
            boxes, label_format = np.zeros((0, 5), np.float32), "none"
            unlabelled += 1
        records.append(ImageRecord(image, height, width, boxes, label_format))
    return SplitIndex(records, problems, unlabelled)


def _fingerprint(images: list[Path], nc: int, orphans: list[Path]) -> str:
    """Return a hash of the image and label files' names, sizes and modification times, and of the orphan labels'
    names."""
    digest = hashlib.sha256(f"{CACHE_VERSION}:{nc}".encode())
    digest.update(":".join(map(str, orphans)).encode())
    for image in images:
        for path in (image, label_path_for(image)):
            try:
                stat = path.stat()
                digest.update(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode())
            except OSError:
                digest.update(f"{path}:missing".encode())
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Return where data set caches go: $TEA_LIGHTNING_CACHE or ~/.cache/tea-lightning."""
    return Path(os.environ.get("TEA_LIGHTNING_CACHE", Path.home() / ".cache" / "tea-lightning"))


def load_split(spec: DataSpec, split: str, cache_dir: Path | None = None) -> SplitIndex:
    """Return the checked index of one split, read from a cache when the files have not changed since."""
    if split not in spec.splits:
        raise DataError(f"{spec.yaml_path} has no '{split}' split.")
    images = list_images(spec.splits[split], spec.yaml_path)
    if not images:
        raise DataError(f"no images found for '{split}' in {', '.join(map(str, spec.splits[split]))} "
                        f"(from {spec.yaml_path}); supported suffixes: {', '.join(IMAGE_SUFFIXES)}.")
    orphans = orphan_labels(images)
    key = _fingerprint(images, spec.nc, orphans)
    cache = (cache_dir or default_cache_dir()) / f"{split}-{key[:24]}.cache"
    index = _read_cache(cache, key)
    if index is None:
        index = scan_split(images, spec.nc, orphans)
        _write_cache(cache, key, index)
    if not index.records:
        raise DataError(f"no usable image for '{split}' in {', '.join(map(str, spec.splits[split]))}: "
                        f"{len(index.problems)} problem(s), first: {index.problems[0] if index.problems else '-'}")
    if index.unlabelled == len(index.records):
        example = index.records[0].image
        raise DataError(f"no label file found for any of the {len(index.records)} '{split}' images (from "
                        f"{spec.yaml_path}): for {example} YOLO reads {label_path_for(example)} (the last images/ "
                        "folder of the path becomes labels/, the suffix .txt). Put the labels there (an image with "
                        "no object gets an empty file), or fix the split's path in the yaml.")
    return index


def _read_cache(cache: Path, key: str) -> SplitIndex | None:
    """Return the cached index if the cache is intact and made from the same files; else None (it is rebuilt)."""
    try:
        with cache.open("rb") as f:
            stored = pickle.load(f)  # our own cache file, written by _write_cache below
        if stored.get("key") == key and stored.get("version") == CACHE_VERSION:
            return stored["index"]
    except FileNotFoundError:
        pass
    except Exception as err:  # a truncated or foreign file: rebuild rather than trust it
        log.warning("Data cache %s is unreadable (%s); rebuilding it.", cache, err)
    return None


def _write_cache(cache: Path, key: str, index: SplitIndex) -> None:
    """Write the cache atomically (temporary file + rename); a read-only location only costs a rescan next time."""
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("wb", dir=cache.parent, delete=False, suffix=".tmp") as tmp:
            pickle.dump({"key": key, "version": CACHE_VERSION, "index": index}, tmp)
        os.replace(tmp.name, cache)
    except OSError as err:
        log.warning("Could not write data cache %s (%s); the data set will be scanned again next time.", cache, err)
