"""Reading data.yaml files and label files: boxes, polygons, and every kind of bad row."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tea_lightning.data.labels import DataError, label_path_for, load_split, parse_label_file, read_data_yaml, \
    read_image_size
from tea_lightning.data.transforms import read_rgb
from tests.conftest import TEA_SHOOTS, need


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def make_dataset(root: Path, labels: dict[str, str], size=(64, 48)) -> Path:
    """Write images/train/<name>.jpg (+ labels) and a data.yaml; return the yaml."""
    for name, text in labels.items():
        (root / "images" / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, (0, 120, 0)).save(root / "images" / "train" / f"{name}.jpg")
        if text is not None:
            write(root / "labels" / "train" / f"{name}.txt", text)
    return write(root / "data.yaml", "train: images/train\nval: images/train\nnames: [a, b]\n")


def test_box_rows_are_read_as_they_are(tmp_path):
    boxes, fmt, problems = parse_label_file(write(tmp_path / "l.txt", "0 0.5 0.5 0.2 0.4\n1 0.1 0.2 0.1 0.1\n"), 2)
    assert fmt == "box" and problems == []
    np.testing.assert_allclose(boxes, [[0, 0.5, 0.5, 0.2, 0.4], [1, 0.1, 0.2, 0.1, 0.1]], atol=1e-6)


def test_polygon_rows_become_their_bounding_box(tmp_path):
    boxes, fmt, problems = parse_label_file(write(tmp_path / "l.txt", "1 0.1 0.2 0.5 0.2 0.4 0.6 0.2 0.5\n"), 2)
    assert fmt == "polygon" and problems == []
    np.testing.assert_allclose(boxes, [[1, 0.3, 0.4, 0.4, 0.4]], atol=1e-6)


def test_a_polygon_past_the_image_edge_is_cut_at_the_edge(tmp_path):
    # points dragged 0.1 past the right and top edges; the polygon's box is normalised, as YOLOv5 checks
    boxes, _, problems = parse_label_file(write(tmp_path / "l.txt", "0 0.8 -0.1 1.1 -0.1 1.1 0.6 0.8 0.6\n"), 2)
    assert problems == []
    np.testing.assert_allclose(boxes, [[0, 0.9, 0.3, 0.2, 0.6]], atol=1e-6)


@pytest.mark.parametrize("line, expected", [
    ("0 0.5 0.5 0.2", "4 values"),
    ("0 0.5 0.5 0.2 0.2 0.1", "6 values"),
    ("0 0.1 0.1 0.2 0.2 0.3 0.3 0.4", "8 values"),
    ("0 0.5 1.5 0.2 0.2", "outside [0, 1]"),
    ("0 -0.5 0.5 0.2 0.2", "outside [0, 1]"),
    ("0 100 50 200 50 200 80", "outside [0, 1]"),  # a polygon in pixels
    ("0 0.9 0.1 1.3 0.1 1.3 0.3", "outside [0, 1]"),  # mostly outside the image: so is its box's centre
    ("0 0.5 abc 0.2 0.2", "non-numeric"),
    ("2 0.5 0.5 0.2 0.2", "class id 2"),
    ("-1 0.5 0.5 0.2 0.2", "class id -1"),
    ("0.5 0.5 0.5 0.2 0.2", "class id 0.5"),
    ("0 0.5 0.5 0 0.2", "zero-size"),
    ("0 0.5 0.5 0.00000001 0.2", "zero-size"),  # non-zero, but no width left in float32
])
def test_bad_rows_are_skipped_with_file_and_line(tmp_path, line, expected):
    path = write(tmp_path / "l.txt", f"0 0.5 0.5 0.1 0.1\n{line}\n")
    boxes, _, problems = parse_label_file(path, 2)
    assert len(boxes) == 1  # the good row survives
    assert len(problems) == 1 and problems[0].line == 2 and expected in problems[0].message
    assert str(problems[0]).startswith(f"{path}:2: ")


def test_duplicate_rows_are_dropped(tmp_path):
    boxes, _, problems = parse_label_file(write(tmp_path / "l.txt", "0 0.5 0.5 0.1 0.1\n0 0.5 0.5 0.1 0.1\n"), 2)
    assert len(boxes) == 1 and "duplicate" in problems[0].message


def test_label_path_replaces_the_last_images_folder():
    assert label_path_for(Path("/d/images/x/images/train/a.jpg")) == Path("/d/images/x/labels/train/a.txt")


def test_yaml_paths_are_relative_to_the_yaml_or_to_path(tmp_path):
    write(tmp_path / "d" / "data.yaml", "path: ../root\ntrain: images/train\nval: images/val\nnames: {0: a, 1: b}\n")
    spec = read_data_yaml(tmp_path / "d" / "data.yaml")
    assert spec.splits["train"] == [(tmp_path / "root" / "images" / "train").resolve()]
    assert spec.names == ["a", "b"] and spec.nc == 2


@pytest.mark.parametrize("content, expected", [
    ("val: v\nnames: [a]\n", "lacks train"),
    ("train: t\nval: v\nnames: [a]\nnc: 2\n", "nc is 2"),
    ("- just a list\n", "must be a mapping"),
    ("train: t\nval: v\nnames: bud\n", "names must be a list"),
    ("train: t\nval: v\nnames: [a]\nnc: one\n", "nc is one"),
    ("train: t\nval: v\nnames: [bud, leaf, bud]\n", "names lists 'bud' more than once"),
])
def test_bad_yaml_names_the_file_and_the_problem(tmp_path, content, expected):
    path = write(tmp_path / "data.yaml", content)
    with pytest.raises(DataError, match=expected) as err:
        read_data_yaml(path)
    assert str(path) in str(err.value)


def test_missing_yaml_and_missing_folder_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_data_yaml(tmp_path / "nope.yaml")
    spec = read_data_yaml(write(tmp_path / "data.yaml", "train: nowhere\nval: nowhere\nnames: [a]\n"))
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_split(spec, "train")


def test_a_split_that_is_an_image_file_is_a_clear_error(tmp_path):
    make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    spec = read_data_yaml(write(tmp_path / "one.yaml", "train: images/train/a.jpg\nval: images/train\nnames: [a]\n"))
    with pytest.raises(DataError, match="a.jpg .*is a file but not a .txt list"):
        load_split(spec, "train")


def test_a_linked_images_folder_keeps_its_labels(tmp_path):
    make_dataset(tmp_path / "photos", {"a": "0 0.5 0.5 0.2 0.2\n"})
    root = tmp_path / "ds"
    write(root / "labels" / "train" / "a.txt", "1 0.5 0.5 0.2 0.2\n")
    (root / "images").symlink_to(tmp_path / "photos" / "images")
    spec = read_data_yaml(write(root / "data.yaml", "train: images/train\nval: images/train\nnames: [a, b]\n"))
    (record,) = load_split(spec, "train", tmp_path / "cache").records
    assert record.boxes[:, 0].tolist() == [1]  # the labels beside the link, not those beside its target


def test_images_only_pil_can_read_or_rotate_are_skipped_or_sized_as_loaded(tmp_path):
    make_dataset(tmp_path, {})
    folder = tmp_path / "images" / "train"
    folder.mkdir(parents=True)
    rotated = Image.new("RGB", (128, 64), (90, 90, 90))
    exif = rotated.getexif()
    exif[0x0112] = 6
    rotated.save(folder / "rotated.tif", exif=exif)
    Image.fromarray(np.full((64, 128), 0.5, np.float32)).save(folder / "float.tif")
    Image.new("RGB", (96, 64), (90, 90, 90)).save(folder / "plain.tif")
    for name in ("rotated", "float", "plain"):
        write(tmp_path / "labels" / "train" / f"{name}.txt", "0 0.5 0.5 0.2 0.2\n")
    index = load_split(read_data_yaml(tmp_path / "data.yaml"), "train", tmp_path / "cache")
    skipped = {p.path.name for p in index.problems if "unreadable image" in p.message}
    assert "plain.tif" not in skipped and {r.image.name for r in index.records} | skipped == {
        "rotated.tif", "float.tif", "plain.tif"}
    for record in index.records:  # every image the scan kept loads, with the size its boxes were checked for
        assert read_rgb(record.image).shape[:2] == (record.height, record.width)


def test_split_scan_reports_problems_and_keeps_good_images(tmp_path):
    yaml_path = make_dataset(tmp_path, {"good": "0 0.5 0.5 0.2 0.2\n", "bad_row": "0 0.5 0.5\n1 0.2 0.2 0.1 0.1\n",
                                        "twice": "1 0.2 0.2 0.1 0.1\n1 0.2 0.2 0.1 0.1\n", "background": None,
                                        "empty": ""})
    (tmp_path / "images" / "train" / "broken.jpg").write_bytes(b"not a jpeg")
    index = load_split(read_data_yaml(yaml_path), "train")
    by_name = {r.image.stem: r for r in index.records}
    # the broken image is skipped, and so is the one with a bad row: its object would be trained as background
    assert set(by_name) == {"good", "twice", "background", "empty"}
    assert len(by_name["twice"].boxes) == 1 and len(by_name["background"].boxes) == 0
    assert index.unlabelled == 1  # "background" has no label file; "empty" has an empty one
    messages = [str(p) for p in index.problems]
    assert any("broken.jpg" in m and "unreadable image" in m for m in messages)
    assert any("bad_row.txt:1" in m for m in messages)
    assert f"{tmp_path / 'images' / 'train' / 'bad_row.jpg'}: skipped: 1 bad row(s) in bad_row.txt (above); fix " \
           "them to train on this image" in messages
    assert any("twice.txt:2: duplicate row, dropped" in m for m in messages)
    assert list(index.instances_per_class(2)) == [1, 1]


def test_a_split_without_any_label_file_names_where_labels_are_read(tmp_path):
    yaml_path = make_dataset(tmp_path, {"a": None, "b": None})
    with pytest.raises(DataError, match=r"no label file found for any of the 2 'train' images .* for "
                                        rf"{tmp_path / 'images' / 'train' / 'a.jpg'} YOLO reads "
                                        rf"{tmp_path / 'labels' / 'train' / 'a.txt'} \(the last images/ folder"):
        load_split(read_data_yaml(yaml_path), "train")
    write(tmp_path / "labels" / "train" / "b.txt", "")  # one empty label file: a data set of background images
    assert len(load_split(read_data_yaml(yaml_path), "train").records) == 2


def test_roboflow_paths_one_folder_up_are_read_beside_the_yaml(tmp_path):
    for split in ("train", "valid"):
        (tmp_path / "export" / split / "images").mkdir(parents=True)
    yaml_path = write(tmp_path / "export" / "data.yaml", "train: ../train/images\nval: ../valid/images\nnames: [a]\n")
    assert read_data_yaml(yaml_path).splits["val"] == [tmp_path / "export" / "valid" / "images"]
    (tmp_path / "valid" / "images").mkdir(parents=True)  # a path that exists as written is taken as written
    assert read_data_yaml(yaml_path).splits["val"] == [tmp_path / "valid" / "images"]


def test_no_usable_image_is_an_error_naming_the_folder(tmp_path):
    yaml_path = make_dataset(tmp_path, {})
    (tmp_path / "images" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no images found.*images/train"):
        load_split(read_data_yaml(yaml_path), "train")
    (tmp_path / "images" / "train" / "x.jpg").write_bytes(b"broken")
    with pytest.raises(DataError, match="no usable image"):
        load_split(read_data_yaml(yaml_path), "train")


def test_cache_is_used_then_rebuilt_when_files_change_or_it_is_corrupt(tmp_path):
    yaml_path = make_dataset(tmp_path, {"a": "0 0.5 0.5 0.2 0.2\n"})
    cache_dir = tmp_path / "cache"
    spec = read_data_yaml(yaml_path)
    assert len(load_split(spec, "train", cache_dir).records[0].boxes) == 1
    (cache_file,) = cache_dir.glob("*.cache")
    write(tmp_path / "labels" / "train" / "a.txt", "0 0.5 0.5 0.2 0.2\n1 0.1 0.1 0.1 0.1\n")
    assert len(load_split(spec, "train", cache_dir).records[0].boxes) == 2  # changed file -> new scan
    for cache in cache_dir.glob("*.cache"):
        cache.write_bytes(b"\x80garbage")
    assert len(load_split(spec, "train", cache_dir).records[0].boxes) == 2  # corrupt cache -> rebuilt


def test_exif_rotation_swaps_the_reported_size(tmp_path):
    image = Image.new("RGB", (64, 32))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert read_image_size(tmp_path / "r.jpg") == (64, 32)


def test_tea_shoots_reads_cleanly():
    spec = read_data_yaml(need(TEA_SHOOTS))
    index = load_split(spec, "val")
    assert len(index.records) == 42 and index.problems == []
    assert int(index.instances_per_class(spec.nc).sum()) == 910  # the count its README and YOLOv5 report
    assert {r.label_format for r in index.records} == {"polygon"}
