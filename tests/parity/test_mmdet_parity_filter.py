"""
MMDetection's training-set filter (DATALOADER.TRAIN_FILTER "mmdet", the official recipe) against
MMDetection 3.3's CocoDataset (parity environment), on a COCO file of the cases it filters:
boxes narrower or lower than 1 px, of area 0, outside the image or only touching it, crowd
boxes, an image with crowd boxes only (kept by MMDetection, dropped by Detectron2's filter), one
without annotations, one under 32 px on a side, one whose every box is dropped. The file is
registered as a user registers theirs (--dataset: vfnet.register_coco_dataset), so that its
checks and fixes (boxes partly outside clipped) run first; MMDetection reads the raw file.
"""
import json

import numpy as np
import pytest

mp = pytest.importorskip("dev.mmdet_parity")
pytest.importorskip("mmdet")
pytest.importorskip("pycocotools")
from PIL import Image  # noqa: E402

IMAGES = [  # id, (height, width), annotations: (bbox XYWH, area, iscrowd)
    (1, (100, 120), [
        ([10, 10, 40, 30], 1200, 0),      # kept
        ([60, 20, 0.5, 30], 15, 0),       # w < 1
        ([60, 20, 30, 0.8], 24, 0),       # h < 1
        ([20, 50, 30, 30], 0, 0),         # area 0
        ([100, 60, 40, 30], 600, 0),      # partly outside: kept (clipped at registration)
        ([5, 60, 20, 20], 400, 1),        # crowd: ignored by both
        ([1, 1, 1, 1], 1, 0),             # 1 x 1: kept
    ]),
    (2, (100, 120), [([10, 10, 40, 30], 1200, 1)]),  # crowd only: kept by MMDetection
    (3, (100, 120), []),                               # no annotation: dropped
    (4, (20, 120), [([10, 5, 40, 10], 400, 0)]),       # 20 px high: dropped (min_size 32)
    (5, (64, 64), [([3, 3, 0.9, 20], 18, 0)]),         # every box dropped, the image kept
    (6, (120, 100), [([0, 0, 100, 120], 12000, 0), ([99.5, 10, 0.6, 20], 12, 0)]),  # whole image; 0.5 px inside but 0.6 wide
]  # fmt: skip


@pytest.fixture(scope="module")
def coco_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("filter")
    images, annotations = [], []
    for img_id, (h, w), anns in IMAGES:
        name = f"{img_id}.png"
        Image.fromarray(np.full((h, w, 3), 128, np.uint8)).save(root / name)
        images.append({"id": img_id, "file_name": name, "height": h, "width": w})
        for bbox, area, crowd in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": 1,
                                "bbox": bbox, "area": area, "iscrowd": crowd})  # fmt: skip
    with open(root / "train.json", "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "thing"}]}, f)
    return root


def mmdet_training_set(root):
    mp.install_mmcv_ops_standins()
    from mmdet.datasets import CocoDataset

    ds = CocoDataset(
        ann_file=str(root / "train.json"), data_prefix=dict(img=str(root) + "/"), metainfo=dict(classes=("thing",)),
        filter_cfg=dict(filter_empty_gt=True, min_size=32), pipeline=[], test_mode=False,
    )  # fmt: skip
    out = {}
    for info in (ds.get_data_info(i) for i in range(len(ds))):
        boxes = [tuple(np.clip(i["bbox"], 0, [info["width"], info["height"]] * 2)) for i in info["instances"] if not i["ignore_flag"]]
        crowd = [tuple(i["bbox"]) for i in info["instances"] if i["ignore_flag"]]
        out[info["img_id"]] = (sorted(boxes), len(crowd))
    return out


def ours(root):
    import vfnet
    from detectron2.structures import BoxMode

    from vfnet.data.detection_utils import get_detection_dataset_dicts_as_mmdet

    name = vfnet.register_coco_dataset(f"filter_parity_train={root / 'train.json'}:{root}")
    out = {}
    for d in get_detection_dataset_dicts_as_mmdet([name], min_size=32):
        boxes = [tuple(BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS)) for a in d["annotations"] if not a.get("iscrowd")]
        out[d["image_id"]] = (sorted(boxes), sum(bool(a.get("iscrowd")) for a in d["annotations"]))
    return out


def test_filter_keeps_the_images_and_boxes_mmdet_trains_on(coco_file):
    theirs, mine = mmdet_training_set(coco_file), ours(coco_file)
    assert sorted(mine) == sorted(theirs) == [1, 2, 5, 6]
    for img_id in theirs:
        assert len(mine[img_id][0]) == len(theirs[img_id][0]) and mine[img_id][1] == theirs[img_id][1], img_id
        np.testing.assert_allclose(np.array(mine[img_id][0]).reshape(-1, 4), np.array(theirs[img_id][0]).reshape(-1, 4), atol=1e-4)
    assert len(mine[1][0]) == 3 and mine[1][1] == 1 and mine[5] == ([], 0) and mine[2] == ([], 1)


def test_detectron2s_filter_differs():
    """What DATALOADER.TRAIN_FILTER "detectron2" gives on the same records (the image of crowd
    boxes only is dropped, every box is kept): the difference the mmdet filter removes."""
    from detectron2.data.build import filter_images_with_only_crowd_annotations
    from detectron2.structures import BoxMode

    dicts = [{"image_id": i, "height": h, "width": w, "annotations": [{"bbox": b, "bbox_mode": BoxMode.XYWH_ABS, "iscrowd": c, "area": a} for b, a, c in anns]}
             for i, (h, w), anns in IMAGES]  # fmt: skip
    kept = filter_images_with_only_crowd_annotations(dicts)
    assert [d["image_id"] for d in kept] == [1, 4, 5, 6] and len(kept[0]["annotations"]) == 7
