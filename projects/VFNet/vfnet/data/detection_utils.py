"""
MMDetection's training-set filter (the official recipe) over Detectron2's dataset dicts, beside
Detectron2's own (`filter_empty_annotations`, DATALOADER.FILTER_EMPTY_ANNOTATIONS); and the
training boxes' fit to VFNet's finest level (:func:`warn_about_tiny_boxes`).

MMDetection's CocoDataset (2.10 and 3.3 alike, ``filter_cfg=dict(filter_empty_gt=True,
min_size=32)``) keeps the images that have at least one annotation in the file (crowd ones
included) and are at least `min_size` pixels on both sides; of their annotations it drops the
boxes that do not intersect the image, narrower or lower than 1 pixel, or of "area" <= 0, and
ignores the crowd ones (Detectron2's mapper drops those from the targets). Detectron2 instead
drops the images without a non-crowd annotation and keeps every box.
"""
import logging
from typing import List, Sequence, Union

import numpy as np
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts
from detectron2.data.build import filter_images_with_only_crowd_annotations
from detectron2.structures import BoxMode
from detectron2.utils.logger import log_first_n

from ..modeling.anchor_fit import anchor_fit_warning, resized_box_sides
from .validation import DROP_UNREADABLE_KEY, DatasetError

__all__ = [
    "TRAIN_FILTERS",
    "filter_dataset_as_mmdet",
    "get_detection_dataset_dicts_as_mmdet",
    "get_training_dataset_dicts",
    "is_valid_mmdet_annotation",
    "training_box_sides",
    "warn_about_tiny_boxes",
]

TRAIN_FILTERS = ("detectron2", "mmdet")

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
    Detectron2's (DATALOADER.TRAIN_FILTER "mmdet"; a LazyConfig's ``dataloader.train.dataset``);
    see :func:`get_training_dataset_dicts`."""
    return get_training_dataset_dicts(names, "mmdet", min_size=min_size)


def get_training_dataset_dicts(
    names: Union[str, Sequence[str]],
    train_filter: str = "detectron2",
    filter_empty: bool = True,
    min_size: int = 32,
) -> List[dict]:
    """
    The training images of the datasets `names` (DATASETS.TRAIN) under a training-set filter
    (DATALOADER.TRAIN_FILTER): "detectron2", Detectron2's `get_detection_dataset_dicts`, which
    drops the images without a non-crowd annotation when `filter_empty`
    (DATALOADER.FILTER_EMPTY_ANNOTATIONS); or "mmdet", :func:`filter_dataset_as_mmdet` with
    `min_size` (DATALOADER.MIN_IMAGE_SIZE).

    Raises:
        DatasetError: when no image is left, naming each dataset, its number of images, how many
            each filter removed, and the keys that keep them.
    """
    if train_filter not in TRAIN_FILTERS:
        raise ValueError(
            f"DATALOADER.TRAIN_FILTER must be one of {TRAIN_FILTERS}, got '{train_filter}'."
        )
    names = [names] if isinstance(names, str) else list(names)
    dataset_dicts = get_detection_dataset_dicts(names, filter_empty=False)
    if train_filter == "mmdet":
        dataset_dicts = filter_dataset_as_mmdet(dataset_dicts, min_size)
    elif filter_empty and dataset_dicts and "annotations" in dataset_dicts[0]:
        # As get_detection_dataset_dicts(filter_empty=True) does, after its class histogram
        # (which counts no image this drops: they have crowd annotations at most).
        dataset_dicts = filter_images_with_only_crowd_annotations(dataset_dicts)
    if not dataset_dicts:
        raise DatasetError(_no_training_image(names, train_filter, filter_empty, min_size))
    return dataset_dicts


def _no_training_image(names: List[str], train_filter: str, filter_empty: bool, min_size: int) -> str:
    """Why the training-set filter left no image of the datasets `names`."""
    per_dataset = []
    for name in names:
        dicts = DatasetCatalog.get(name)
        annotations = [d.get("annotations", []) for d in dicts]
        if train_filter == "mmdet":
            empty = sum(not anns for anns in annotations)
            small = sum(
                bool(anns) and min(d["height"], d["width"]) < min_size
                for d, anns in zip(dicts, annotations)
            )
            removed = (
                f"DATALOADER.TRAIN_FILTER 'mmdet' removed {empty} without annotations and {small} "
                f"smaller than {min_size} px on a side (DATALOADER.MIN_IMAGE_SIZE)"
            )
        else:
            empty = sum(not any(a.get("iscrowd", 0) == 0 for a in anns) for anns in annotations)
            removed = (
                f"DATALOADER.FILTER_EMPTY_ANNOTATIONS True removed its {empty} without a "
                "(non-crowd) annotation"
                if filter_empty
                else "no filter removed any"
            )
        meta = MetadataCatalog.get(name)
        dropped = meta.get("dropped_images") or []
        at_registration = (
            f"; {len(dropped)} of the {meta.get('num_source_images')} images of its JSON were "
            f"left out before, their files unreadable ({DROP_UNREADABLE_KEY})"
            if dropped
            else ""
        )
        per_dataset.append(f"dataset '{name}' has {len(dicts)} images: {removed}{at_registration}")
    if train_filter == "mmdet":
        keep = (
            "DATALOADER.TRAIN_FILTER detectron2 with DATALOADER.FILTER_EMPTY_ANNOTATIONS False "
            "keeps the images without annotations (trained on as background), and a smaller "
            "DATALOADER.MIN_IMAGE_SIZE the small ones"
        )
    else:
        keep = (
            "DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps the images without annotations "
            "(trained on as background)"
        )
    return (
        f"No training image is left of DATASETS.TRAIN {tuple(names)}: "
        + "; ".join(per_dataset)
        + f". {keep}; or annotate the images (a detector learns nothing from a training set "
        "without a box)."
    )


def training_box_sides(dataset_dicts: List[dict], short_edge: int, max_size: int) -> np.ndarray:
    """sqrt(w x h) of every non-crowd box of `dataset_dicts` after Detectron2's resize of its image
    to `short_edge` (longer side at most `max_size`)."""
    box_wh, image_hw = [], []
    for record in dataset_dicts:
        for ann in record.get("annotations", ()):
            if ann.get("iscrowd", 0):
                continue
            x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
            box_wh.append((x1 - x0, y1 - y0))
            image_hw.append((record["height"], record["width"]))
    if not box_wh:
        return np.zeros(0)
    return resized_box_sides(np.array(box_wh), np.array(image_hw), short_edge, max_size)


def warn_about_tiny_boxes(cfg, dataset_dicts: List[dict]) -> None:
    """
    At the start of a VFNet training: warn (once per process) when a large share of the training
    boxes, at the largest training input scale (INPUT.MIN_SIZE_TRAIN, MAX_SIZE_TRAIN or
    MAX_SIZE_TRAIN_RANGE), is too small for the grid of the finest level (the stride of
    MODEL.VFNET.IN_FEATURES[0]); see :func:`vfnet.modeling.anchor_fit.anchor_fit_warning`.
    """
    short_edge = max(cfg.INPUT.MIN_SIZE_TRAIN)
    max_size = max(cfg.INPUT.MAX_SIZE_TRAIN_RANGE or (cfg.INPUT.MAX_SIZE_TRAIN,))
    stride = 2 ** int(cfg.MODEL.VFNET.IN_FEATURES[0].lstrip("p"))
    sides = training_box_sides(dataset_dicts, short_edge, max_size)
    message = anchor_fit_warning(sides, stride, (short_edge, max_size))
    if message:
        log_first_n(logging.WARNING, message, n=1, name=__name__, key="message")
