"""
The training pipeline against MMDetection 3.3's transforms on the same images and random draws
(run in the parity environment): range resize, keep-ratio Resize, RandomCrop, RandomFlip.
"""
import numpy as np
import pytest

pytest.importorskip("mmdet", reason="MMDetection is not installed (optional: see README, parity with MMDetection)")
pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.data import transforms as T  # noqa: E402

from dev import mmdet_parity as mp  # noqa: E402
from vfnet.data.augmentations import RandomKeepRatioResize  # noqa: E402
from vfnet.data.transforms import CV2ResizeTransform  # noqa: E402

mp.install_mmcv_ops_standins()
from mmcv.transforms import RandomResize  # noqa: E402
from mmdet.datasets.transforms import RandomCrop, RandomFlip, Resize  # noqa: E402
from mmdet.structures.bbox import HorizontalBoxes  # noqa: E402

SIZES = [(480, 640), (427, 640), (640, 359), (333, 500), (612, 612), (1000, 77)]


def results(h, w, seed=0):
    rng = np.random.RandomState(seed)
    img = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
    x1, y1 = rng.uniform(0, w / 2, 6), rng.uniform(0, h / 2, 6)
    boxes = np.stack([x1, y1, x1 + rng.uniform(1, w / 2, 6), y1 + rng.uniform(1, h / 2, 6)], 1).astype(np.float32)
    return {"img": img, "img_shape": (h, w), "gt_bboxes": HorizontalBoxes(boxes),
            "gt_bboxes_labels": np.arange(6), "gt_ignore_flags": np.zeros(6, bool)}


@pytest.mark.parametrize("h,w", SIZES)
def test_range_resize_draws_and_resizes_as_mmdet(h, w):
    ours = RandomKeepRatioResize((750, 2100), (500, 1400))
    theirs = RandomResize(scale=[(2100, 1400), (750, 500)], resize_type="mmdet.Resize", keep_ratio=True)
    for seed in range(30):
        r = results(h, w, seed)
        boxes = r["gt_bboxes"].numpy().copy()
        np.random.seed(seed)
        out = theirs.transform(r)
        np.random.seed(seed)
        t = ours.get_transform(np.zeros((h, w, 3), np.uint8))
        t = CV2ResizeTransform(t.h, t.w, t.new_h, t.new_w, t.interp)
        img = t.apply_image(results(h, w, seed)["img"])
        assert img.shape == out["img"].shape, seed
        np.testing.assert_array_equal(img, out["img"])
        np.testing.assert_allclose(t.apply_box(boxes), out["gt_bboxes"].numpy(), rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("h,w", SIZES)
def test_detectron2_shortest_edge_range_equals_mmdet_resize_over_1333x480_960(h, w):
    d2 = T.ResizeShortestEdge((480, 960), 1333, "range")
    for short in range(480, 961, 7):
        out = Resize(scale=(1333, short), keep_ratio=True).transform(results(h, w))
        assert d2.get_output_shape(h, w, short, 1333) == out["img"].shape[:2], short


@pytest.mark.parametrize("h,w", SIZES)
def test_relative_range_crop_draws_as_mmdet(h, w):
    ours = T.RandomCrop("relative_range", (0.75, 0.75))
    theirs = RandomCrop(crop_size=(0.75, 0.75), crop_type="relative_range", allow_negative_crop=True)
    for seed in range(30):
        r = results(h, w, seed)
        boxes = r["gt_bboxes"].numpy().copy()
        np.random.seed(seed)
        out = theirs.transform(r)
        np.random.seed(seed)
        t = ours.get_transform(np.zeros((h, w, 3), np.uint8))
        np.testing.assert_array_equal(t.apply_image(results(h, w, seed)["img"]), out["img"])
        # MMDetection clips the boxes to the crop and keeps those with positive area, as
        # Detectron2's transform_instance_annotations (clip) + filter_empty_instances do.
        clipped = np.clip(t.apply_box(boxes), 0, [t.w, t.h, t.w, t.h])
        keep = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        np.testing.assert_allclose(clipped[keep], out["gt_bboxes"].numpy(), atol=1e-4)


def test_horizontal_flip_as_mmdet():
    r = results(333, 500)
    boxes = r["gt_bboxes"].numpy().copy()
    out = RandomFlip(prob=1.0, direction="horizontal").transform(r)
    t = T.HFlipTransform(500)
    np.testing.assert_array_equal(t.apply_image(results(333, 500)["img"]), out["img"])
    np.testing.assert_allclose(t.apply_box(boxes), out["gt_bboxes"].numpy(), atol=1e-4)


def test_training_mapper_reads_a_json_of_integer_boxes_as_mmdet(tmp_path):
    """
    A COCO JSON of whole-pixel (integer) boxes, read, resized to the official training size
    (800, max 1333; OpenCV as MMDetection) and mapped by this project's training mapper and by
    MMDetection's CocoDataset and pipeline: the same pixels and the same boxes (Detectron2's
    in-place box transform truncates integer boxes by up to a pixel).
    """
    import json

    from detectron2.data import DatasetCatalog
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    from helpers import small_cfg, tiny_shapes
    from vfnet.data.datasets import register_coco_dataset
    from vfnet.data.mapper import VFNetDatasetMapper

    root = tiny_shapes(tmp_path, 6, 1)
    with open(root / "train.json") as f:
        assert all(isinstance(v, int) for a in json.load(f)["annotations"] for v in a["bbox"])
    name = register_coco_dataset(f"int_boxes_train={root / 'train.json'}:{root / 'train'}")
    cfg = small_cfg("INPUT.MIN_SIZE_TRAIN", "(800,)", "INPUT.MAX_SIZE_TRAIN", "1333", "INPUT.RANDOM_FLIP",
                    "none", "INPUT.RESIZE_BACKEND", "cv2", "INPUT.FORMAT", "BGR")  # fmt: skip
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    d2 = {d["image_id"]: mapper(d) for d in DatasetCatalog.get(name)}

    register_all_modules()
    pipeline = [dict(type="LoadImageFromFile"), dict(type="LoadAnnotations", with_bbox=True),
                dict(type="Resize", scale=(1333, 800), keep_ratio=True), dict(type="PackDetInputs")]  # fmt: skip
    mm = CocoDataset(ann_file=str(root / "train.json"), data_prefix=dict(img=str(root / "train") + "/"),
                     pipeline=pipeline, metainfo=dict(classes=("circle", "rectangle", "triangle", "cross")))  # fmt: skip
    assert len(mm) == len(d2) == 6
    for i in range(len(mm)):
        item = mm[i]
        sample = item["data_samples"]
        ours = d2[sample.img_id]
        np.testing.assert_array_equal(ours["image"].numpy(), item["inputs"].numpy())
        np.testing.assert_array_equal(ours["instances"].gt_classes.numpy(), sample.gt_instances.labels.numpy())
        np.testing.assert_allclose(
            ours["instances"].gt_boxes.tensor.numpy(), sample.gt_instances.bboxes.numpy(), rtol=0, atol=1e-3
        )
