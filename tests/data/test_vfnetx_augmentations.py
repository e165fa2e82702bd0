"""VFNet-X's training augmentations: hand-worked cases and their stated distributions."""
import numpy as np
import pytest

from detectron2.config import get_cfg
from detectron2.data import transforms as T

import vfnet
from vfnet.data.augmentations import (
    RandomBoxCutOut,
    RandomKeepRatioResize,
    build_train_augmentations,
    keep_ratio_size,
    sample_box_cutout,
)
from vfnet.data.mapper import VFNetDatasetMapper
from vfnet.data.transforms import CV2RandomKeepRatioResize, CV2ResizeShortestEdge

OFFICIAL_SHAPES = [(4, 4), (4, 8), (8, 4), (8, 8), (16, 8), (8, 16), (16, 16), (16, 32), (32, 16),
                   (32, 32), (32, 48), (48, 32), (48, 48)]


def vfnetx_cfg():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "relative_range"
    cfg.INPUT.CROP.SIZE = [0.75, 0.75]
    cfg.INPUT.CROP.PROB = 0.5
    cfg.INPUT.MIN_SIZE_TRAIN = (500, 1400)
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "range"
    cfg.INPUT.MAX_SIZE_TRAIN_RANGE = (750, 2100)
    cfg.INPUT.CUTOUT.ENABLED = True
    return cfg


def test_keep_ratio_size_by_hand():
    # 480 x 640, scale (2100, 500): min(2100 / 640, 500 / 480) = 1.0417: 500 x 666.67 -> 667.
    assert keep_ratio_size(480, 640, 2100, 500) == (500, 667)
    # scale (750, 1400): min(750 / 640, 1400 / 480) = 1.171875: 562.5 -> 563 (half up), 750.
    assert keep_ratio_size(480, 640, 750, 1400) == (563, 750)
    # Portrait: 640 x 480 gives the transposed sizes.
    assert keep_ratio_size(640, 480, 750, 1400) == (750, 563)


def test_range_resize_swaps_a_short_draw_above_the_long_one():
    np.random.seed(5)
    aug = RandomKeepRatioResize((750, 2100), (500, 1400))
    draws = []
    np.random.seed(5)
    for _ in range(200):
        draws.append((np.random.randint(750, 2101), np.random.randint(500, 1401)))
    np.random.seed(5)
    image = np.zeros((480, 640, 3), np.uint8)
    for long_, short in draws:
        t = aug.get_transform(image)
        assert (t.new_h, t.new_w) == keep_ratio_size(480, 640, max(long_, short), min(long_, short))
    assert any(s > l for l, s in draws)


def test_range_resize_draws_long_and_short_edges_independently_and_uniformly():
    np.random.seed(0)
    aug = RandomKeepRatioResize((750, 2100), (500, 1400))
    image = np.zeros((1000, 1000, 3), np.uint8)  # square: the size is min(long, short)
    sizes = np.array([aug.get_transform(image).new_h for _ in range(20000)])
    long_, short = np.random.RandomState(1).randint(750, 2101, 10**6), np.random.RandomState(2).randint(500, 1401, 10**6)
    expected = np.minimum(long_, short)
    assert sizes.min() >= 500 and sizes.max() <= 1400
    # E[min(L, S)] of the two independent uniform draws.
    assert abs(sizes.mean() - expected.mean()) < 5
    assert abs(np.mean(sizes < 750) - np.mean(expected < 750)) < 0.01


def test_detectron2_range_resize_equals_mmdet_range_over_1333x480_960():
    """The 2x configs' [(1333, 480), (1333, 960)] range: the long edge is always 1333, the short one
    uniform in [480, 960]: Detectron2's ResizeShortestEdge range with max size 1333, same sizes."""
    d2 = T.ResizeShortestEdge((480, 960), 1333, "range")
    for h, w in [(480, 640), (427, 640), (640, 359), (1, 1000), (333, 500), (1000, 1000), (612, 612)]:
        for short in range(480, 961):
            assert d2.get_output_shape(h, w, short, 1333) == keep_ratio_size(h, w, 1333, short), (h, w, short)


def test_cutout_holes_by_hand():
    np.random.seed(3)
    boxes = np.array([[10.5, 20.2, 30.9, 25.0]])
    rects = sample_box_cutout(boxes, (5, 10), OFFICIAL_SHAPES, prob=1.0)
    assert 5 <= len(rects) <= 10
    # Corners in the integers of the box (10..30, 20..25), ends clipped to the box.
    assert (rects[:, 0] >= 10).all() and (rects[:, 0] <= 30).all()
    assert (rects[:, 1] >= 20).all() and (rects[:, 1] <= 25).all()
    assert (rects[:, 2] <= 30).all() and (rects[:, 3] <= 25).all()
    # Replay the same draws by hand.
    np.random.seed(3)
    assert np.random.choice([True, False], p=[1.0, 0.0])
    n = np.random.randint(5, 11)
    assert n == len(rects)
    for r in rects:
        cx, cy = np.random.randint(10, 31), np.random.randint(20, 26)
        w, h = OFFICIAL_SHAPES[np.random.randint(0, 13)]
        assert tuple(r) == (cx, cy, int(np.clip(cx + w, 10.5, 30.9)), int(np.clip(cy + h, 20.2, 25.0)))


def test_cutout_distributions():
    np.random.seed(0)
    boxes = np.array([[0.0, 0.0, 400.0, 400.0]])
    counts, sizes = [], []
    for _ in range(4000):
        rects = sample_box_cutout(boxes, (5, 10), OFFICIAL_SHAPES, prob=0.5)
        counts.append(len(rects))
        sizes += [(x2 - x1, y2 - y1) for x1, y1, x2, y2 in rects if x1 + 48 <= 400 and y1 + 48 <= 400]
    counts = np.array(counts)
    assert abs(np.mean(counts == 0) - 0.5) < 0.03  # p 0.5 per box
    assert set(counts[counts > 0]) == set(range(5, 11))
    assert abs(counts[counts > 0].mean() - 7.5) < 0.1  # uniform over 5..10
    freq = {s: sizes.count(s) / len(sizes) for s in OFFICIAL_SHAPES}
    assert set(map(tuple, sizes)) == set(OFFICIAL_SHAPES)
    assert all(abs(f - 1 / 13) < 0.01 for f in freq.values())


def test_cutout_fills_the_holes_and_keeps_the_boxes():
    np.random.seed(1)
    image = np.full((64, 64, 3), 200, np.uint8)
    aug_input = T.AugInput(image, boxes=np.array([[8.0, 8.0, 40.0, 40.0]]))
    t = T.AugmentationList([RandomBoxCutOut((5, 10), OFFICIAL_SHAPES, prob=1.0, fill=(0, 0, 0))])(aug_input)
    rects = t.transforms[0].rects
    expected = np.full((64, 64, 3), 200, np.uint8)
    for x1, y1, x2, y2 in rects:
        expected[y1:y2, x1:x2] = 0
    np.testing.assert_array_equal(aug_input.image, expected)
    assert (aug_input.image[:8] == 200).all() and (aug_input.image[41:] == 200).all()
    np.testing.assert_array_equal(aug_input.boxes, [[8.0, 8.0, 40.0, 40.0]])


def test_crop_probability_and_relative_range():
    np.random.seed(0)
    cfg = vfnetx_cfg()
    augs = build_train_augmentations(cfg, [T.RandomCrop("relative_range", (0.75, 0.75))])
    image = np.zeros((400, 600, 3), np.uint8)
    shapes = [augs[0].get_transform(image) for _ in range(4000)]
    crops = [t for t in shapes if isinstance(t, T.CropTransform)]
    assert abs(len(crops) / 4000 - 0.5) < 0.03
    h = np.array([t.h for t in crops])
    w = np.array([t.w for t in crops])
    # Official: int(400 * U(0.75, 1) + 0.5): uniform over 300..400, mean 350.
    assert h.min() >= 300 and h.max() <= 400 and abs(h.mean() - 350) < 2
    assert w.min() >= 450 and w.max() <= 600 and abs(w.mean() - 525) < 3


def test_train_augmentations_in_the_official_order():
    cfg = vfnetx_cfg()
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    kinds = [type(a) for a in mapper.augmentations.augs]
    assert kinds == [T.RandomApply, RandomKeepRatioResize, RandomBoxCutOut, T.RandomFlip]
    cfg.INPUT.RESIZE_BACKEND = "cv2"
    assert type(VFNetDatasetMapper(cfg, is_train=True).augmentations.augs[1]) is CV2RandomKeepRatioResize
    # The test mapper keeps Detectron2's.
    assert [type(a) for a in VFNetDatasetMapper(cfg, is_train=False).augmentations.augs] == [CV2ResizeShortestEdge]


def test_range_resize_needs_a_short_edge_range():
    cfg = vfnetx_cfg()
    cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING = "choice"
    with pytest.raises(ValueError, match="INPUT.MAX_SIZE_TRAIN_RANGE"):
        VFNetDatasetMapper(cfg, is_train=True)


def test_mapper_cuts_out_inside_the_transformed_boxes(tmp_path):
    from PIL import Image

    path = tmp_path / "a.png"
    Image.fromarray(np.full((100, 200, 3), 255, np.uint8)).save(path)
    cfg = vfnetx_cfg()
    cfg.INPUT.CROP.ENABLED = False
    cfg.INPUT.MIN_SIZE_TRAIN = (200, 200)
    cfg.INPUT.MAX_SIZE_TRAIN_RANGE = (400, 400)  # x2 exactly
    cfg.INPUT.RANDOM_FLIP = "none"
    cfg.INPUT.CUTOUT.PROB = 1.0
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    from detectron2.structures import BoxMode

    d = {"file_name": str(path), "height": 100, "width": 200, "image_id": 1,
         "annotations": [{"bbox": [10, 10, 30, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}]}
    np.random.seed(0)
    out = mapper(d)
    img = out["image"].numpy()
    assert img.shape == (3, 200, 400)
    dark = np.argwhere(img.min(0) == 0)
    assert len(dark) > 0
    # Box (10, 10, 40, 30) x2 = (20, 20, 80, 60): the holes lie inside it.
    assert dark[:, 0].min() >= 20 and dark[:, 0].max() < 60 and dark[:, 1].min() >= 20 and dark[:, 1].max() < 80
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[20, 20, 80, 60]])
