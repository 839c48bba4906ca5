"""The boxes predict draws: each label's text lies on its own coloured tag, above the box or, at the image's top
edge, inside it."""

import cv2
import numpy as np
import pytest

from tea_lightning.model.writer import DetectionWriter


@pytest.mark.parametrize("top, tag_rows", [(200, range(170, 200)), (12, range(12, 40))])
def test_label_text_lies_on_its_tag_above_the_box_or_inside_it_at_the_top_edge(tmp_path, top, tag_rows):
    path = tmp_path / "grey.png"
    cv2.imwrite(str(path), np.full((640, 640, 3), 90, np.uint8))
    drawn = DetectionWriter._draw(path, np.array([[100, top, 300, top + 200, 0.87, 0]], np.float32), ["bud"])
    white = np.argwhere((drawn >= 250).all(-1))  # the label's text
    assert len(white) > 20
    assert set(white[:, 0]) <= set(tag_rows)  # every text pixel on the tag's rows, none on the bare image
    tag = drawn[white[:, 0].min() - 1:white[:, 0].max() + 1, 100:110]
    assert not (tag == 90).all(-1).any()  # the tag is filled with the class colour under and around the text


def test_labels_on_small_images_are_as_tall_as_yolov5s(tmp_path):
    # YOLOv5's Annotator draws lines at least 2 px thick and text at a third of that scale: on a 256 px image the
    # label stands about 18 px tall (9 px at 1 px lines, hard to read)
    path = tmp_path / "small.png"
    cv2.imwrite(str(path), np.full((256, 256, 3), 90, np.uint8))
    drawn = DetectionWriter._draw(path, np.array([[40, 100, 200, 200, 0.87, 0]], np.float32), ["bud"])
    text_rows = np.unique(np.argwhere((drawn >= 250).all(-1))[:, 0])
    assert text_rows.max() - text_rows.min() + 1 >= 12
