import json
import os

import numpy as np
import pytest
from PIL import Image

from vfnet.data import shapes
from vfnet.data.shapes import (
    SHAPE_CLASSES,
    draw_scene,
    ensure_shapes_dataset,
    generate_split,
    mask_to_xywh,
    scene_rng,
)


def _tight_box(mask):
    ys, xs = np.nonzero(mask)
    return [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]


def _box_iou(a, b):
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(iw, 0) * max(ih, 0)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _scenes(num, seed=0, size=(128, 192)):
    rng = np.random.default_rng(seed)
    for _ in range(num):
        height, width = (int(s) for s in rng.integers(size[0], size[1] + 1, size=2))
        yield draw_scene(rng, height, width)


def _png_pixels(path):
    with Image.open(path) as im:
        return np.asarray(im)


def test_mask_to_xywh():
    mask = np.zeros((7, 9), dtype=bool)
    mask[2, 3] = True
    assert mask_to_xywh(mask) == [3, 2, 1, 1]
    mask[4:7, 5:9] = True
    assert mask_to_xywh(mask) == [3, 2, 6, 5]
    assert all(type(v) is int for v in mask_to_xywh(mask))
    with pytest.raises(ValueError):
        mask_to_xywh(np.zeros((3, 3), dtype=bool))


def test_draw_scene_outputs_and_boxes():
    for image, masks, labels in _scenes(40):
        height, width = image.shape[:2]
        assert image.dtype == np.uint8 and image.shape == (height, width, 3)
        assert len(masks) == len(labels) <= 6
        for mask, label in zip(masks, labels):
            assert mask.dtype == bool and mask.shape == (height, width)
            assert 0 <= label < len(SHAPE_CLASSES)
            x, y, w, h = mask_to_xywh(mask)
            assert [x, y, w, h] == _tight_box(mask)
            assert 0 <= x and 0 <= y and x + w <= width and y + h <= height
            assert max(w, h) >= 9


def test_draw_scene_visible_pixels_and_overlaps():
    for image, masks, _ in _scenes(40, seed=1):
        boxes = [mask_to_xywh(m) for m in masks]
        for i, mask in enumerate(masks):
            visible = mask.copy()
            for later in masks[i + 1 :]:
                visible &= ~later
            # Objects are flat-coloured: every visible pixel has the object's single colour.
            assert len(np.unique(image[visible], axis=0)) == 1
            # No object is hidden by more than 40% (small tolerance for rounding).
            assert visible.sum() >= 0.6 * mask.sum() - 1
            for j in range(i):
                assert _box_iou(boxes[i], boxes[j]) <= 0.6


def test_draw_scene_statistics():
    scenes = list(_scenes(150, seed=2))
    counts = np.bincount([l for _, _, labels in scenes for l in labels], minlength=4)
    assert len(counts) == len(SHAPE_CLASSES) and (counts > 0).all()
    assert any(len(labels) == 0 for _, _, labels in scenes)
    sides = [max(mask_to_xywh(m)[2:]) for _, masks, _ in scenes for m in masks]
    assert min(sides) < 20 and max(sides) > 80


def test_draw_scene_deterministic():
    a = draw_scene(np.random.default_rng(5), 100, 140)
    b = draw_scene(np.random.default_rng(5), 100, 140)
    np.testing.assert_array_equal(a[0], b[0])
    assert a[2] == b[2]
    for ma, mb in zip(a[1], b[1]):
        np.testing.assert_array_equal(ma, mb)


def test_generate_split_deterministic(tmp_path):
    paths = [generate_split(str(tmp_path / d), "train", 6, seed=3) for d in ("a", "b")]
    with open(paths[0], "rb") as f0, open(paths[1], "rb") as f1:
        assert f0.read() == f1.read()
    for name in sorted(os.listdir(tmp_path / "a" / "train")):
        with open(tmp_path / "a" / "train" / name, "rb") as f0:
            with open(tmp_path / "b" / "train" / name, "rb") as f1:
                assert f0.read() == f1.read()

    other = generate_split(str(tmp_path / "c"), "train", 6, seed=4)
    with open(paths[0], "rb") as f0, open(other, "rb") as f1:
        assert f0.read() != f1.read()
    a = _png_pixels(tmp_path / "a" / "train" / "000000.png")
    c = _png_pixels(tmp_path / "c" / "train" / "000000.png")
    assert a.shape != c.shape or (a != c).any()


def test_generate_split_matches_draw_scene(tmp_path):
    json_path = generate_split(str(tmp_path), "val", 5, seed=7, image_size=(64, 96), max_objects=4)
    with open(json_path) as f:
        coco = json.load(f)
    for index, im in enumerate(coco["images"]):
        rng = scene_rng(7, "val", index)
        height, width = (int(s) for s in rng.integers(64, 97, size=2))
        image, masks, labels = draw_scene(rng, height, width, max_objects=4)
        assert (im["height"], im["width"]) == (height, width)
        np.testing.assert_array_equal(_png_pixels(tmp_path / "val" / im["file_name"]), image)
        anns = [a for a in coco["annotations"] if a["image_id"] == im["id"]]
        assert [a["bbox"] for a in anns] == [_tight_box(m) for m in masks]
        assert [a["area"] for a in anns] == [int(m.sum()) for m in masks]
        assert [a["category_id"] for a in anns] == [l + 1 for l in labels]


def test_generate_split_is_valid_coco(tmp_path):
    json_path = generate_split(str(tmp_path), "train", 12, seed=0)
    assert json_path == str(tmp_path / "train.json")
    assert sorted(os.listdir(tmp_path)) == ["train", "train.json"]  # no temporary file left
    with open(json_path) as f:
        coco = json.load(f)
    assert [c["id"] for c in coco["categories"]] == [1, 2, 3, 4]
    assert tuple(c["name"] for c in coco["categories"]) == SHAPE_CLASSES
    images = {im["id"]: im for im in coco["images"]}
    assert len(images) == 12
    for im in images.values():
        with Image.open(tmp_path / "train" / im["file_name"]) as png:
            assert png.mode == "RGB" and png.size == (im["width"], im["height"])
    ann_ids = [a["id"] for a in coco["annotations"]]
    assert len(set(ann_ids)) == len(ann_ids) > 0
    for ann in coco["annotations"]:
        im = images[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert x >= 0 and y >= 0 and w > 0 and h > 0
        assert x + w <= im["width"] and y + h <= im["height"]
        assert 0 < ann["area"] <= w * h
        assert ann["iscrowd"] == 0 and 1 <= ann["category_id"] <= len(SHAPE_CLASSES)


def test_pycocotools_loads(tmp_path):
    coco_module = pytest.importorskip("pycocotools.coco")
    json_path = generate_split(str(tmp_path), "val", 4, seed=0)
    api = coco_module.COCO(json_path)
    assert len(api.getImgIds()) == 4 and len(api.getCatIds()) == len(SHAPE_CLASSES)


def test_ensure_shapes_dataset_caches(tmp_path):
    root = str(tmp_path)
    kwargs = dict(num_train=4, num_val=2, image_size=(64, 80))
    splits = ensure_shapes_dataset(root, **kwargs)
    assert set(splits) == {"train", "val"}
    json_path, image_dir = splits["train"]
    assert json_path == os.path.join(root, "train.json")
    assert image_dir == os.path.join(root, "train")
    with open(json_path) as f:
        info = json.load(f)["info"]
    assert info["params"]["image_size"] == [64, 80] and info["num_images"] == 4
    assert info["params"]["max_objects"] == 6  # defaults are recorded too

    stat = os.stat(json_path)
    png_mtime = os.stat(os.path.join(image_dir, "000000.png")).st_mtime_ns
    assert ensure_shapes_dataset(root, **kwargs) == splits
    assert os.stat(json_path).st_mtime_ns == stat.st_mtime_ns
    assert os.stat(json_path).st_ino == stat.st_ino
    assert os.stat(os.path.join(image_dir, "000000.png")).st_mtime_ns == png_mtime

    ensure_shapes_dataset(root, max_objects=2, **kwargs)
    with open(json_path) as f:
        coco = json.load(f)
    assert coco["info"]["params"]["max_objects"] == 2
    assert max(np.bincount([a["image_id"] for a in coco["annotations"]])) <= 2


def test_ensure_shapes_dataset_regenerates_missing_images(tmp_path):
    root = str(tmp_path)
    json_path, image_dir = ensure_shapes_dataset(root, num_train=3, num_val=1)["train"]
    os.remove(os.path.join(image_dir, "000001.png"))
    ensure_shapes_dataset(root, num_train=3, num_val=1)
    assert os.path.isfile(os.path.join(image_dir, "000001.png"))


def test_interrupted_generation_leaves_no_json(tmp_path, monkeypatch):
    root = str(tmp_path)
    json_path = generate_split(root, "train", 3, seed=0)
    calls = []

    def failing_draw_scene(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return draw_scene(*args, **kwargs)

    monkeypatch.setattr(shapes, "draw_scene", failing_draw_scene)
    with pytest.raises(KeyboardInterrupt):
        generate_split(root, "train", 3, seed=1)
    assert not os.path.exists(json_path)
    assert sorted(os.listdir(root)) == ["train"]


def test_splits_differ(tmp_path):
    train = generate_split(str(tmp_path), "train", 2, seed=0)
    val = generate_split(str(tmp_path), "val", 2, seed=0)
    a = _png_pixels(tmp_path / "train" / "000000.png")
    b = _png_pixels(tmp_path / "val" / "000000.png")
    assert a.shape != b.shape or (a != b).any()
    assert train != val


def test_backgrounds_are_drawn_only_of_the_kinds_asked_for():
    from vfnet.data.shapes import draw_scene, scene_rng

    def roughness(kind, index):
        image, masks, _ = draw_scene(scene_rng(5, kind, index), 64, 64, empty_prob=1.0, backgrounds=(kind,))
        assert masks == []
        return np.abs(np.diff(image.astype(float), axis=1)).mean()

    # A gradient changes by well under a level per pixel, plus a jitter of amplitude <= 6
    # (mean |difference| <= 4); noise backgrounds add an amplitude of 10-40 (>= 6.7).
    assert max(roughness("gradient", i) for i in range(20)) < 4.5
    assert min(roughness("noise", i) for i in range(20)) > 6


def _orientation_deg(mask):
    """
    Orientation of a mask's principal axis from its second moments, in degrees in (-90, 90], and
    the ratio of the moments' eigenvalues (1 for a square or a disc, where the axis is undefined).
    """
    ys, xs = np.nonzero(mask)
    xs, ys = xs - xs.mean(), ys - ys.mean()
    cov = np.cov(np.stack([xs, ys]))
    low, high = np.linalg.eigvalsh(cov)
    angle = np.degrees(0.5 * np.arctan2(2 * cov[0, 1], cov[0, 0] - cov[1, 1]))
    return angle, high / low


def test_max_rotation_zero_draws_axis_aligned_shapes():
    rng = np.random.default_rng(3)
    rectangles = 0
    for _ in range(30):
        _, masks, labels = draw_scene(rng, 160, 160, max_rotation=0.0, max_occlusion=0.0)
        for mask, label in zip(masks, labels):
            if SHAPE_CLASSES[label] == "rectangle":
                # An unrotated rectangle fills its box (up to the anti-aliased rim).
                x, y, w, h = mask_to_xywh(mask)
                assert mask.sum() >= (w - 2) * (h - 2)
                rectangles += 1
    assert rectangles >= 10


def test_max_rotation_bounds_the_orientation():
    # Stretched rectangles (aspect >= 1.5) have a well-defined principal axis: the unrotated one is
    # along x or y, so with a rotation of at most 30 deg the axis stays within 30 deg of x or y.
    rng = np.random.default_rng(4)
    angles = {30.0: [], 180.0: []}
    for max_rotation in angles:
        for _ in range(60):
            _, masks, labels = draw_scene(
                rng, 160, 160, max_rotation=max_rotation, max_occlusion=0.0, min_object_size=30
            )
            for mask, label in zip(masks, labels):
                if SHAPE_CLASSES[label] != "rectangle":
                    continue
                a, elongation = _orientation_deg(mask)
                if elongation >= 1.5 ** 2:
                    off_axis = min(abs(a), 90 - abs(a))
                    angles[max_rotation].append(off_axis)
    assert len(angles[30.0]) >= 10 and max(angles[30.0]) <= 31
    # Any rotation: off-axis angles spread over [0, 45], so the bound above is not vacuous.
    assert max(angles[180.0]) > 35
