"""
MMDetection's training-set filter (the official recipe) over Detectron2's dataset dicts, beside
Detectron2's own (`filter_empty_annotations`, DATALOADER.FILTER_EMPTY_ANNOTATIONS).

MMDetection's CocoDataset (2.10 and 3.3 alike, ``filter_cfg=dict(filter_empty_gt=True,
min_size=32)``) keeps the images that have at least one annotation in the file (crowd ones
included) and are at least `min_size` pixels on both sides; of their annotations it drops the
boxes that do not intersect the image, narrower or lower than 1 pixel, or of "area" <= 0, and
ignores the crowd ones (Detectron2's mapper drops those from the targets). Detectron2 instead
drops the images without a non-crowd annotation and keeps every box.
"""
import logging
from typing import List

from detectron2.data import get_detection_dataset_dicts
from detectron2.structures import BoxMode

__all__ = ["filter_dataset_as_mmdet", "get_detection_dataset_dicts_as_mmdet", "is_valid_mmdet_annotation"]

logger = logging.getLogger(__name__)


def is_valid_mmdet_annotation(annotation: dict, height: int, width: int) -> bool:
    """
    Whether MMDetection trains on `annotation` (a Detectron2 annotation dict of an image of
    `height` x `width`): its box overlaps the image, is at least 1 x 1, and its "area" (when
    the dict has one) is positive.
    """
    x1, y1, w, h = BoxMode.convert(list(annotation["bbox"]), annotation["bbox_mode"], BoxMode.XYWH_ABS)
    inter_w = max(0.0, min(x1 + w, width) - max(x1, 0.0))
    inter_h = max(0.0, min(y1 + h, height) - max(y1, 0.0))
    if inter_w * inter_h == 0:
        return False
    return annotation.get("area", 1.0) > 0 and w >= 1 and h >= 1


def filter_dataset_as_mmdet(dataset_dicts: List[dict], min_size: int = 32) -> List[dict]:
    """
    Args:
        dataset_dicts: Detectron2 dataset dicts (with "height", "width", "annotations"), as
            `get_detection_dataset_dicts(..., filter_empty=False)` returns them.
        min_size: the shorter image side below which an image is dropped.

    Returns:
        new dicts of the images MMDetection trains on, with the annotations it trains on (and
        the crowd ones, which the mapper ignores).
    """
    kept, num_boxes = [], 0
    for d in dataset_dicts:
        annotations = d.get("annotations", [])
        if not annotations or min(d["height"], d["width"]) < min_size:
            continue
        valid = [a for a in annotations if is_valid_mmdet_annotation(a, d["height"], d["width"])]
        num_boxes += len(annotations) - len(valid)
        kept.append(dict(d, annotations=valid))
    logger.info(
        "MMDetection's filter: %d of %d images kept (with an annotation, %d px or more on a side); "
        "%d boxes dropped (outside the image, under 1 px, or of area <= 0).",
        len(kept), len(dataset_dicts), min_size, num_boxes,
    )  # fmt: skip
    return kept


def get_detection_dataset_dicts_as_mmdet(names, min_size: int = 32) -> List[dict]:
    """Detectron2's `get_detection_dataset_dicts(names)` under MMDetection's filter instead of
    Detectron2's (DATALOADER.TRAIN_FILTER "mmdet"; a LazyConfig's ``dataloader.train.dataset``)."""
    return filter_dataset_as_mmdet(get_detection_dataset_dicts(names, filter_empty=False), min_size)
