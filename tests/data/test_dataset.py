"""Datasets and transforms: letterbox geometry as YOLOv5 does it, augmentation that keeps boxes on their objects."""

import numpy as np
import pytest
import torch
from PIL import Image

from tea_lightning.data.dataset import EvalDataset, TrainDataset, collate
from tea_lightning.data.labels import ImageRecord
from tea_lightning.data.transforms import PAD_VALUE, Augmentation, HSVGains, letterbox, mosaic_canvas, rect_shape
from tea_lightning.model.postprocess import unletterbox_boxes
from tests.conftest import TEA_SHOOTS, need

NO_AUGMENTATION = Augmentation(mosaic=0, scale=0, translate=0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0)


def square_image(tmp_path, name, size_hw, box_xyxy):
    """Write a grey image with one red rectangle; return its record with the matching YOLO box."""
    h, w = size_hw
    pixels = np.full((h, w, 3), 60, np.uint8)
    x1, y1, x2, y2 = box_xyxy
    pixels[y1:y2, x1:x2] = (255, 0, 0)
    path = tmp_path / f"{name}.png"
    Image.fromarray(pixels).save(path)
    box = [0, (x1 + x2) / 2 / w, (y1 + y2) / 2 / h, (x2 - x1) / w, (y2 - y1) / h]
    return ImageRecord(path, h, w, np.array([box], np.float32), "box")


def red_pixels_box(image_chw: torch.Tensor) -> np.ndarray:
    """Return the xyxy box around the red pixels of a (3, H, W) uint8 image."""
    r, g, b = image_chw.numpy().astype(int)
    ys, xs = np.nonzero((r > 180) & (g < 90) & (b < 90))
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], float)


def yolo_to_xyxy(label, w, h):
    _, cx, cy, bw, bh = label.tolist()
    return np.array([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h])


@pytest.mark.parametrize("aspects, expected", [([512 / 512], (672, 672)), ([480 / 640], (512, 672)),
                                               ([640 / 480], (672, 512)), ([0.5, 0.75], (512, 672)),
                                               ([1.25, 3.0], (672, 544)), ([0.5, 2.0], (672, 672))])
def test_rect_shape_matches_yolov5_rect_batches(aspects, expected):
    # YOLOv5's LoadImagesAndLabels(rect=True): a batch of only wide (or only tall) images gets the shape of its
    # squarest one's side ratio limit, a batch of both a square
    assert rect_shape(aspects, img_size=640) == expected


def test_letterbox_pads_around_the_centre_and_never_upscales():
    image = np.zeros((100, 201, 3), np.uint8)
    out, ratio, (dw, dh) = letterbox(image, (160, 224))
    assert out.shape == (160, 224, 3) and ratio == 1.0
    assert (dw, dh) == (11.5, 30.0)
    assert (out[:30] == 114).all() and (out[130:] == 114).all()


def test_eval_sample_boxes_map_back_to_the_original_image(tmp_path):
    record = square_image(tmp_path, "a", (300, 500), (100, 50, 180, 120))
    sample = EvalDataset([record], img_size=640)[0]
    assert tuple(sample.image.shape[1:]) == rect_shape([300 / 500], 640)
    h, w = sample.image.shape[1:]
    letterboxed = torch.tensor(yolo_to_xyxy(sample.labels[0], w, h))[None]
    np.testing.assert_allclose(letterboxed[0], red_pixels_box(sample.image), atol=1.5)
    back = unletterbox_boxes(letterboxed, sample.ratio, torch.tensor(sample.pad), torch.tensor([300, 500]))
    np.testing.assert_allclose(back[0], [100, 50, 180, 120], atol=1e-3)


def test_eval_batches_centre_every_image_in_the_shape_of_their_most_extreme_aspect_ratio(tmp_path):
    # YOLOv5's rect batches; padding each image to its own shape and the batch at the bottom right moved the wide
    # image off the centre of the batch shape, so the model saw it at another place than in YOLOv5's val.py
    wide = square_image(tmp_path, "wide", (100, 300), (30, 20, 90, 60))
    squarish = square_image(tmp_path, "squarish", (200, 240), (30, 20, 90, 60))
    tall = square_image(tmp_path, "tall", (300, 100), (30, 20, 90, 60))
    dataset = EvalDataset([tall, squarish, wide], 128, batch_size=2)  # batches: [wide, squarish], [tall]
    first, second, third = (dataset[i] for i in range(3))
    assert tuple(first.image.shape[1:]) == tuple(second.image.shape[1:]) == rect_shape([200 / 240], 128) == (128, 160)
    assert tuple(third.image.shape[1:]) == rect_shape([3.0], 128) == (160, 64)
    assert first.pad == (16.0, 42.5)  # the wide image (128 x 43 after resizing) in the middle of the batch shape
    for sample, original in ((first, (100, 300)), (second, (200, 240))):
        h, w = sample.image.shape[1:]
        letterboxed = torch.tensor(yolo_to_xyxy(sample.labels[0], w, h))[None]
        np.testing.assert_allclose(letterboxed[0], red_pixels_box(sample.image), atol=1.5)
        back = unletterbox_boxes(letterboxed, sample.ratio, torch.tensor(sample.pad), torch.tensor(original))
        np.testing.assert_allclose(back[0], [30, 20, 90, 60], atol=1e-3)


def test_eval_dataset_orders_images_by_aspect_ratio(tmp_path):
    records = [square_image(tmp_path, n, hw, (1, 1, 5, 5)) for n, hw in
               [("wide", (100, 300)), ("tall", (300, 100)), ("square", (200, 200))]]
    assert [r.image.stem for r in EvalDataset(records, 128).records] == ["wide", "square", "tall"]


def test_training_without_augmentation_is_a_letterbox(tmp_path):
    record = square_image(tmp_path, "a", (120, 200), (20, 30, 60, 90))
    sample = TrainDataset([record], 160, NO_AUGMENTATION)[0]
    assert tuple(sample.image.shape) == (3, 160, 160)
    np.testing.assert_allclose(yolo_to_xyxy(sample.labels[0], 160, 160), red_pixels_box(sample.image), atol=1.5)


def test_training_drops_boxes_yolov5_drops_slivers_and_specks(tmp_path):
    record = square_image(tmp_path, "a", (160, 160), (0, 0, 1, 1))
    # [cls, cx, cy, w, h] of 160 px: sides 15:1 (kept), 25:1 (YOLOv5: over 20, dropped), 1.5 px (dropped), 6 px (kept)
    record.boxes = np.array([[0, 0.5, 0.2, 60 / 160, 4 / 160], [1, 0.5, 0.5, 100 / 160, 4 / 160],
                             [2, 0.2, 0.8, 1.5 / 160, 1.5 / 160], [3, 0.8, 0.8, 6 / 160, 6 / 160]], np.float32)
    sample = TrainDataset([record], 160, NO_AUGMENTATION)[0]
    assert sample.labels[:, 0].tolist() == [0, 3]


def test_augmented_boxes_stay_on_their_objects(tmp_path):
    records = [square_image(tmp_path, f"img{i}", (200, 200), (70 + i, 60, 130, 140 - i)) for i in range(4)]
    dataset = TrainDataset(records, 160, Augmentation(mosaic=0.0, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0.5))
    checked = 0
    for i in range(12):
        sample = dataset[i % 4]
        if len(sample.labels) == 1 and sample.labels[0, 3] * 160 > 8:  # whole object in view
            np.testing.assert_allclose(yolo_to_xyxy(sample.labels[0], 160, 160), red_pixels_box(sample.image),
                                       atol=3)
            checked += 1
    assert checked >= 6


def test_mosaic_combines_images_and_keeps_boxes_inside(tmp_path):
    records = [square_image(tmp_path, f"img{i}", (100, 100), (30, 30, 70, 70)) for i in range(6)]
    dataset = TrainDataset(records, 128, Augmentation())
    counts = [len(dataset[i % 6].labels) for i in range(10)]
    assert max(counts) >= 2  # several source images in one sample
    labels = torch.cat([dataset[i % 6].labels for i in range(10)])
    assert ((labels[:, 1:] >= 0) & (labels[:, 1:] <= 1)).all()


def test_close_mosaic_reaches_loader_workers_that_persist_between_epochs(tmp_path):
    # a grey image among blue ones: its sample shows blue only when it is a mosaic
    records = [square_image(tmp_path, "grey", (100, 100), (30, 30, 70, 70))]
    for i in range(3):
        path = tmp_path / f"blue{i}.png"
        Image.fromarray(np.full((100, 100, 3), (0, 0, 255), np.uint8)).save(path)
        records.append(ImageRecord(path, 100, 100, np.zeros((0, 5), np.float32), "box"))
    dataset = TrainDataset(records, 128, Augmentation(hsv_h=0, hsv_s=0, hsv_v=0, close_mosaic=2))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=[0] * 8, num_workers=1,
                                         persistent_workers=True, collate_fn=collate)

    def samples_showing_blue() -> int:
        return sum(bool(((image[2] > 180) & (image[0] < 90)).any()) for batch in loader for image in batch["images"])

    torch.manual_seed(0)  # the worker's seed
    dataset.set_epoch(7, 10)
    assert samples_showing_blue() >= 5
    dataset.set_epoch(8, 10)  # the worker started in epoch 7 draws these
    assert samples_showing_blue() == 0
    dataset.set_epoch(0, -1)  # no epoch limit: the mosaic stays
    assert not dataset.mosaic_closed


def test_hsv_gains_are_yolov5s():
    from yolov5.utils.augmentations import augment_hsv

    image = np.asarray(Image.open(min((need(TEA_SHOOTS).parent / "images" / "val").iterdir())).convert("RGB"))
    for seed in range(3):
        np.random.seed(seed)
        gains = np.random.uniform(-1, 1, 3) * [0.015, 0.7, 0.4] + 1  # YOLOv5's draw, repeated below
        np.random.seed(seed)
        expected = image[..., ::-1].copy()  # YOLOv5 works on BGR in place
        augment_hsv(expected, 0.015, 0.7, 0.4)
        ours = HSVGains(0.015, 0.7, 0.4).apply(image, gains=list(gains))
        assert np.array_equal(ours, expected[..., ::-1])


def test_the_hue_gain_moves_green_by_a_fraction_of_its_hue_and_red_not_at_all():
    import cv2

    green_red = np.array([[[40, 160, 40], [200, 20, 20]]], np.uint8)
    hue = cv2.cvtColor(green_red, cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)  # OpenCV's 0-180
    transform = HSVGains(0.015, 0, 0)
    for _ in range(20):
        moved = cv2.cvtColor(transform(image=green_red)["image"], cv2.COLOR_RGB2HSV)[0, :, 0].astype(int)
        assert abs(moved[0] - hue[0]) <= 0.015 * hue[0] + 1 and moved[1] == hue[1]


def test_the_mosaic_canvas_puts_a_corner_of_each_image_at_its_centre_as_yolov5_does():
    # four 4:3 and 3:4 images, each a plain colour with a white object; albumentations' Mosaic centred each one in
    # its cell, which left a padding band through the mosaic
    colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (200, 200, 0)]
    tiles = []
    for colour, (h, w) in zip(colours, [(96, 128), (128, 96), (96, 128), (128, 96)]):
        image = np.full((h, w, 3), colour, np.uint8)
        image[20:50, 30:70] = 255
        tiles.append((image, np.array([[1, 50 / w, 35 / h, 40 / w, 30 / h]], np.float32)))
    for seed in range(5):
        canvas, labels = mosaic_canvas(tiles, 128, np.random.default_rng(seed))
        assert canvas.shape == (256, 256, 3)
        bottom, right = np.argwhere((canvas == colours[0]).all(2)).max(0) + 1  # the first tile's corner
        assert 64 <= bottom <= 192 and 64 <= right <= 192  # the centre lies in the middle half
        for colour, (dy, dx) in zip(colours, [(-1, -1), (-1, 0), (0, -1), (0, 0)]):  # each pixel around the centre
            assert tuple(canvas[bottom + dy, right + dx]) == colour
        assert len(labels) >= 1
        for label in labels:  # every box lies on a white object (one cut at the canvas edge too)
            _, cx, cy, w, h = label * np.array([1, 256, 256, 256, 256])
            inside = canvas[int(cy - h / 2) + 1:int(cy + h / 2) - 1, int(cx - w / 2) + 1:int(cx + w / 2) - 1]
            assert inside.size and (inside == 255).all()


def test_a_zoomed_out_mosaic_shows_more_mosaic_not_padding(tmp_path):
    # YOLOv5 scales the whole 2s x 2s mosaic about its centre and keeps the middle s x s: zoomed out (scale < 1)
    # or shifted, the window shows more of the mosaic. Scaling an s x s window instead padded a quarter of it.
    records = [square_image(tmp_path, f"img{i}", (100, 100), (30, 30, 70, 70)) for i in range(6)]
    dataset = TrainDataset(records, 128, Augmentation(scale=0.5, hsv_h=0, hsv_s=0, hsv_v=0, fliplr=0))
    padded = [(dataset[i % 6].image == PAD_VALUE).all(0).float().mean().item() for i in range(30)]
    assert np.mean(padded) < 0.1


def test_ddp_processes_with_the_same_seed_augment_differently(tmp_path):
    records = [square_image(tmp_path, f"img{i}", (100, 100), (30 + i, 30, 70, 70 - i)) for i in range(6)]

    def first_samples(rank: int) -> list[torch.Tensor]:
        torch.manual_seed(0)  # Lightning seeds every DDP process alike
        dataset = TrainDataset(records, 128, Augmentation(), rank)
        return [dataset[i].image for i in range(3)]

    rank0, rank1 = first_samples(0), first_samples(1)
    assert all(torch.equal(a, b) for a, b in zip(rank0, first_samples(0)))  # reproducible per process
    assert not any(torch.equal(a, b) for a, b in zip(rank0, rank1))


def test_without_mosaic_no_other_image_is_read(tmp_path, monkeypatch):
    import tea_lightning.data.dataset as dataset_module

    records = [square_image(tmp_path, f"img{i}", (100, 100), (30, 30, 70, 70)) for i in range(4)]
    reads = []
    monkeypatch.setattr(dataset_module, "read_rgb", lambda path: reads.append(path) or np.asarray(Image.open(path)))
    dataset = TrainDataset(records, 128, Augmentation(mosaic=0.0))
    for i in range(4):
        dataset[i]
    assert reads == [r.image for r in records]


def test_collate_pads_to_the_largest_image_and_renormalises_targets(tmp_path):
    small = square_image(tmp_path, "small", (100, 300), (30, 20, 90, 60))
    large = square_image(tmp_path, "large", (300, 300), (30, 20, 90, 60))
    samples = [EvalDataset([r], 128)[0] for r in (small, large)]
    batch = collate(samples)
    H, W = batch["images"].shape[2:]
    assert (H, W) == (max(s.image.shape[1] for s in samples), max(s.image.shape[2] for s in samples))
    first = batch["targets"][batch["targets"][:, 0] == 0][0, 1:]
    np.testing.assert_allclose(yolo_to_xyxy(first, W, H), red_pixels_box(batch["images"][0]), atol=1.5)


def test_importance_loader_gives_the_same_unaugmented_images_spread_over_the_split(synthetic_yaml):
    from tea_lightning.data.datamodule import YoloDataModule

    data = YoloDataModule(str(synthetic_yaml), img_size=128, batch_size=3, workers=0)
    first, again = ([b for b in data.importance_dataloader(6)] for _ in range(2))
    assert [len(b["images"]) for b in first] == [3, 3]
    assert all(torch.equal(a["images"], b["images"]) and torch.equal(a["targets"], b["targets"])
               for a, b in zip(first, again))
    # every other one of the 16 training images, not the first six
    names = sorted(p for b in first for p in b["paths"])
    assert names == sorted(str(r.image) for r in data.split("train").records[::2][:6])
