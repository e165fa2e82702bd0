"""The training mapper's boxes after the resize: exact for a COCO JSON's integer boxes."""
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.structures import BoxMode  # noqa: E402

import vfnet  # noqa: E402
from vfnet.data.mapper import VFNetDatasetMapper  # noqa: E402

# XYWH boxes as a JSON of whole pixels holds them (Python ints), on a 600 x 1000 image.
INT_BOXES = [[35, 80, 13, 9], [500, 301, 250, 120], [0, 0, 999, 599]]


def mapped_boxes(tmp_path, boxes, flip="none"):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((600, 1000, 3), dtype=np.uint8)).save(path)
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.INPUT.MIN_SIZE_TRAIN = (800,)  # the official configs' training size
    cfg.INPUT.MAX_SIZE_TRAIN = 1333
    cfg.INPUT.RANDOM_FLIP = flip
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    record = {
        "file_name": str(path),
        "height": 600,
        "width": 1000,
        "image_id": 1,
        "annotations": [
            {"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0, "iscrowd": 0} for b in boxes
        ],
    }
    out = mapper(record)
    assert tuple(out["image"].shape[1:]) == (800, 1333)
    return out["instances"].gt_boxes.tensor.double().numpy()


def test_integer_boxes_are_resized_exactly_not_truncated(tmp_path):
    # By hand: 600 x 1000 -> 800 x 1333 scales x by 1333 / 1000, y by 800 / 600.
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in INT_BOXES], dtype=np.float64)
    expected = xyxy * np.array([1.333, 4 / 3, 1.333, 4 / 3])
    got = mapped_boxes(tmp_path, INT_BOXES)
    # float32 boxes: 1e-4 px; Detectron2's in-place transform of an integer array is up to 1 px
    # off (46.655 -> 46 for the first box's x1).
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    float_boxes = [[float(v) for v in b] for b in INT_BOXES]
    np.testing.assert_array_equal(got, mapped_boxes(tmp_path, float_boxes))


def test_integer_boxes_are_flipped_after_the_exact_resize(tmp_path):
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in INT_BOXES], dtype=np.float64)
    resized = xyxy * np.array([1.333, 4 / 3, 1.333, 4 / 3])
    flipped = np.stack([1333 - resized[:, 2], resized[:, 1], 1333 - resized[:, 0], resized[:, 3]], 1)
    for _ in range(20):  # the flip is random (p = 0.5): each output is one of the two
        got = mapped_boxes(tmp_path, INT_BOXES, flip="horizontal")
        assert np.allclose(got, resized, atol=1e-4) or np.allclose(got, flipped, atol=1e-4)
