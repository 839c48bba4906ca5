import cv2
import numpy as np
import pytest
import yaml

from tea_lightning.data import synthetic
from tea_lightning.data.synthetic import make_synthetic_dataset

ARGS = dict(n_train=20, n_val=10, image_size=128, num_classes=4, max_objects=5, seed=3)


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(root, split):
    """Label rows of a split as {file stem: [(class id, values)]}."""
    out = {}
    for path in sorted((root / "labels" / split).glob("*.txt")):
        rows = [line.split() for line in path.read_text().splitlines()]
        out[path.stem] = [(int(r[0]), np.array(r[1:], float)) for r in rows]
    return out


@pytest.fixture(scope="module")
def polygon_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("polygon")
    make_synthetic_dataset(root, **ARGS)
    return root


@pytest.fixture(scope="module")
def box_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("box")
    make_synthetic_dataset(root, label_format="box", **ARGS)
    return root


def test_layout_counts_and_background_images(polygon_root):
    for split, n in (("train", 20), ("val", 10)):
        images = sorted((polygon_root / "images" / split).glob("*.jpg"))
        labels = sorted((polygon_root / "labels" / split).glob("*.txt"))
        assert len(images) == n
        assert cv2.imread(str(images[0])).shape == (128, 128, 3)
        # about 10% are background images, which have no label file at all
        assert len(labels) == n - round(n / 10)
        assert {p.stem for p in labels} < {p.stem for p in images}
        assert all(p.read_text().strip() for p in labels)


def test_data_yaml_matches_arguments(tmp_path):
    path = make_synthetic_dataset(tmp_path, n_train=2, n_val=1, num_classes=3, seed=7)
    assert path == tmp_path / "data.yaml"
    data = yaml.safe_load(path.read_text())
    assert data == {"train": "images/train", "val": "images/val", "nc": 3, "names": ["bud", "leaf", "class_2"]}
    first = path.read_text().splitlines()[0]
    assert first.startswith("#") and "synthetic" in first.lower() and "seed 7" in first
    two = yaml.safe_load(make_synthetic_dataset(tmp_path / "two", n_train=2, n_val=1).read_text())
    assert two["nc"] == 2 and two["names"] == ["bud", "leaf"]


def test_deterministic_for_a_seed(tmp_path, polygon_root):
    make_synthetic_dataset(tmp_path / "same", **ARGS)
    assert _files(tmp_path / "same") == _files(polygon_root)
    make_synthetic_dataset(tmp_path / "other", **{**ARGS, "seed": 4})
    assert _rows(tmp_path / "other", "train") != _rows(polygon_root, "train")


def test_regenerating_leaves_no_stale_files(tmp_path):
    make_synthetic_dataset(tmp_path / "reused", **{**ARGS, "seed": 4})
    make_synthetic_dataset(tmp_path / "reused", **ARGS)
    make_synthetic_dataset(tmp_path / "fresh", **ARGS)
    assert _files(tmp_path / "reused") == _files(tmp_path / "fresh")


@pytest.mark.parametrize("fmt", ["polygon", "box"])
def test_label_lines_are_well_formed(fmt, polygon_root, box_root):
    root = polygon_root if fmt == "polygon" else box_root
    classes = []
    for split in ("train", "val"):
        for path in (root / "labels" / split).glob("*.txt"):
            for line in path.read_text().splitlines():
                cls, *values = line.split()
                assert all(len(v.split(".")[1]) == 6 for v in values)
                if fmt == "box":
                    assert len(values) == 4
                else:
                    assert len(values) % 2 == 0 and 8 <= len(values) // 2 <= 16
                values = np.array(values, float)
                assert ((values >= 0) & (values <= 1)).all()
                classes.append(int(cls))
    assert set(classes) == {0, 1, 2, 3}


def test_polygon_and_box_formats_describe_the_same_boxes(polygon_root, box_root):
    polygon_files, box_files = _files(polygon_root), _files(box_root)
    assert {k: v for k, v in polygon_files.items() if k.startswith("images/")} == {
        k: v for k, v in box_files.items() if k.startswith("images/")
    }
    for split in ("train", "val"):
        polygons, boxes = _rows(polygon_root, split), _rows(box_root, split)
        assert polygons.keys() == boxes.keys()
        for stem in polygons:
            for (cls_p, poly), (cls_b, box) in zip(polygons[stem], boxes[stem], strict=True):
                xy = poly.reshape(-1, 2)
                lo, hi = xy.min(0), xy.max(0)
                assert cls_p == cls_b
                np.testing.assert_allclose(np.r_[(lo + hi) / 2, hi - lo], box, atol=2e-6)


def _check_box_fits_mask(box, mask, size, exact=False):
    """box: normalised cx, cy, w, h; mask: the drawn object's pixels, exact if uncompressed and not thresholded."""
    cx, cy, w, h = np.asarray(box) * size
    x0, y0, x1, y1 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    ys, xs = np.nonzero(mask)
    assert len(xs) > 20
    # every drawn pixel (pixel i covers [i, i + 1)) lies inside the box widened by 2 pixels
    assert xs.min() >= x0 - 2 and xs.max() + 1 <= x1 + 2 and ys.min() >= y0 - 2 and ys.max() + 1 <= y1 + 2
    m0, m1 = np.array([xs.min(), ys.min()]), np.array([xs.max() + 1, ys.max() + 1])
    if exact:  # each side of the drawn pixels' box is within a pixel (plus the 1/4 px supersampling) of the label's
        np.testing.assert_array_less(np.abs(np.r_[m0 - (x0, y0), m1 - (x1, y1)]), 1.25)
    iou = synthetic._iou(np.r_[x0, y0, x1, y1], np.r_[m0, m1])
    assert iou > 0.8, iou


@pytest.mark.parametrize("cls", range(4))
def test_label_box_tightly_encloses_the_drawn_object(cls):
    size = 256
    for seed in range(10):
        rng = np.random.default_rng(seed)
        poly = synthetic._place(rng, cls, size, [])
        canvas = np.zeros((size, size, 3), np.float32)
        synthetic._draw_object(canvas, cls, poly, rng)
        box = synthetic._label_line(cls, poly, size, "box").split()[1:]
        _check_box_fits_mask(np.array(box, float), canvas.max(-1) > 0, size, exact=True)


def test_written_single_object_image_matches_its_label(tmp_path, monkeypatch):
    # a black background isolates the object's pixels in the written JPEG
    monkeypatch.setattr(synthetic, "_background", lambda rng, size: np.zeros((size, size, 3), np.float32))
    make_synthetic_dataset(tmp_path, n_train=8, n_val=1, num_classes=4, max_objects=1, label_format="box")
    for stem, [(_, box)] in _rows(tmp_path, "train").items():
        image = cv2.imread(str(tmp_path / "images" / "train" / f"{stem}.jpg"))
        # 60 is well above noise and JPEG ringing on black, well below the dimmest object colour
        _check_box_fits_mask(box, image.max(-1) > 60, 256)


@pytest.mark.parametrize(
    "name, value",
    [("n_train", 0), ("n_val", 0), ("image_size", 16), ("num_classes", 0), ("num_classes", 5),
     ("max_objects", 0), ("label_format", "mask"), ("seed", -1), ("n_train", 2.5)],
)
def test_invalid_arguments_raise_value_error_naming_them(tmp_path, name, value):
    with pytest.raises(ValueError, match=name):
        make_synthetic_dataset(tmp_path / "out", **{name: value})
    assert not (tmp_path / "out").exists()
