"""
DATALOADER.TRAIN_FILTER: MMDetection's training-set filter (vfnet/data/detection_utils.py) on
hand-worked records, and the training loader of a config reading it. MMDetection's own
CocoDataset on a file of the same cases: tests/parity/test_mmdet_parity_filter.py.
"""
import pytest

from detectron2.structures import BoxMode

from vfnet.data.detection_utils import filter_dataset_as_mmdet, is_valid_mmdet_annotation


def ann(bbox, area=100.0, iscrowd=0, mode=BoxMode.XYWH_ABS):
    return {"bbox": bbox, "bbox_mode": mode, "area": area, "iscrowd": iscrowd, "category_id": 0}


@pytest.mark.parametrize(
    "a, valid",
    [
        (ann([10, 10, 1, 1]), True),  # 1 x 1 px
        (ann([10, 10, 0.99, 5]), False),
        (ann([10, 10, 5, 0.99]), False),
        (ann([10, 10, 5, 5], area=0), False),
        (ann([10, 10, 5, 5], area=-3), False),
        (ann([120, 10, 5, 5]), False),  # starts at the right border: no overlap
        (ann([-5, 10, 5, 5]), False),  # ends at the left border
        (ann([118, 98, 10, 10]), True),  # 2 x 2 px inside
        (ann([10, 10, 15, 15], mode=BoxMode.XYXY_ABS), True),  # XYXY: 5 x 5
        (ann([10, 10, 10.5, 15], mode=BoxMode.XYXY_ABS), False),  # XYXY: 0.5 wide
        ({"bbox": [10, 10, 5, 5], "bbox_mode": BoxMode.XYWH_ABS}, True),  # no "area" (built-in COCO)
    ],
)
def test_annotation_rule(a, valid):
    assert is_valid_mmdet_annotation(a, height=100, width=120) is valid


def test_images_with_any_annotation_and_32_px_are_kept():
    dicts = [
        {"image_id": 1, "height": 100, "width": 120, "annotations": [ann([1, 1, 5, 5]), ann([1, 1, 0.5, 5])]},
        {"image_id": 2, "height": 100, "width": 120, "annotations": [ann([1, 1, 5, 5], iscrowd=1)]},
        {"image_id": 3, "height": 100, "width": 120, "annotations": []},
        {"image_id": 4, "height": 31, "width": 120, "annotations": [ann([1, 1, 5, 5])]},
        {"image_id": 5, "height": 32, "width": 32, "annotations": [ann([1, 1, 0.5, 5])]},
    ]
    kept = filter_dataset_as_mmdet(dicts, min_size=32)
    assert [d["image_id"] for d in kept] == [1, 2, 5]
    assert [len(d["annotations"]) for d in kept] == [1, 1, 0]
    assert len(dicts[0]["annotations"]) == 2  # the input is not modified


def test_the_configs_train_loader_reads_the_filter(tmp_path):
    import json

    import numpy as np
    from PIL import Image

    import vfnet
    from vfnet.data.build import _train_loader_from_config
    from helpers import load_config as load

    images = [{"id": i, "file_name": f"{i}.png", "height": 40, "width": 50} for i in (1, 2)]
    for im in images:
        Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / im["file_name"])
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0.5, 10], "area": 5, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 1, "bbox": [5, 5, 10, 10], "area": 100, "iscrowd": 1}]  # fmt: skip
    with open(tmp_path / "t.json", "w") as f:
        json.dump({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}, f)
    name = vfnet.register_coco_dataset(f"train_filter_t={tmp_path / 't.json'}:{tmp_path}")
    cfg = load("VFNet_Shapes_Demo.yaml", "DATASETS.TRAIN", f"('{name}',)")
    assert cfg.DATALOADER.TRAIN_FILTER == "mmdet"
    kept = _train_loader_from_config(cfg, mapper=None)["dataset"]
    assert [(d["image_id"], len(d["annotations"])) for d in kept] == [(1, 0), (2, 1)]
    cfg.DATALOADER.TRAIN_FILTER = "detectron2"  # images with a non-crowd annotation, every box
    kept = _train_loader_from_config(cfg, mapper=None)["dataset"]
    assert [(d["image_id"], len(d["annotations"])) for d in kept] == [(1, 1)]
    cfg.DATALOADER.TRAIN_FILTER = "mmdet3"
    with pytest.raises(ValueError, match="DATALOADER.TRAIN_FILTER.*'mmdet3'"):
        _train_loader_from_config(cfg, mapper=None)
