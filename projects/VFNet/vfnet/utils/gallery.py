"""
A picture of a model's detections: validation images with their detections drawn by Detectron2's
`Visualizer`, side by side in one grid image.
"""
import math
from typing import List, Sequence

import numpy as np
import torch
from PIL import Image

from detectron2.data import MetadataCatalog, build_detection_test_loader, get_detection_dataset_dicts
from detectron2.utils.visualizer import Visualizer

from ..data.mapper import read_image

__all__ = ["draw_detections", "tile_images", "write_dataset_gallery", "write_gallery"]


def tile_images(images: Sequence[np.ndarray], columns: int, gap: int = 4) -> np.ndarray:
    """
    Args:
        images: (H_i, W_i, 3) uint8 images.

    Returns:
        (H, W, 3) uint8: the images row by row, `columns` per row, each in a cell of the
        largest height and width, on white, `gap` pixels apart.
    """
    rows = math.ceil(len(images) / columns)
    cell_h = max(im.shape[0] for im in images)
    cell_w = max(im.shape[1] for im in images)
    grid = np.full(
        (rows * cell_h + (rows - 1) * gap, columns * cell_w + (columns - 1) * gap, 3), 255, np.uint8
    )
    for i, im in enumerate(images):
        y, x = (i // columns) * (cell_h + gap), (i % columns) * (cell_w + gap)
        grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    return grid


def _enlarged(image: np.ndarray, instances, min_size: int):
    """`image` (H, W, 3) and its detections, enlarged (nearest pixel) to a shorter side of
    `min_size` when it is smaller; the Visualizer then draws labels of its usual size."""
    height, width = image.shape[:2]
    scale = min_size / min(height, width)
    if scale <= 1:
        return image, instances
    size = (round(width * scale), round(height * scale))
    image = np.asarray(Image.fromarray(image).resize(size, Image.NEAREST))
    instances.pred_boxes.scale(size[0] / width, size[1] / height)
    return image, instances


def draw_detections(
    model, mapper, dataset_dicts: List[dict], metadata, score_thresh: float, min_size: int = 384
) -> List[np.ndarray]:
    """
    The images of `dataset_dicts` (loaded and resized by `mapper`, the test mapper) with the
    detections of `model` scoring >= `score_thresh`, drawn by Detectron2's Visualizer; RGB uint8
    arrays of the image's original size, enlarged where its shorter side is under `min_size`,
    so that the labels of small images stay apart and legible.
    """
    loader = build_detection_test_loader(dataset_dicts, mapper=mapper)
    drawings = []
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for inputs in loader:
                instances = model(inputs)[0]["instances"].to("cpu")
                instances = instances[instances.scores >= score_thresh]
                # As the mapper reads it: EXIF orientation, 16-bit, truncated files.
                image = read_image(
                    inputs[0]["file_name"], format="RGB",
                    load_truncated=getattr(mapper, "load_truncated_images", False),
                )  # fmt: skip
                image, instances = _enlarged(image, instances, min_size)
                drawing = Visualizer(image, metadata).draw_instance_predictions(instances)
                drawings.append(drawing.get_image())
    finally:
        model.train(training)
    return drawings


def write_gallery(model, cfg, mapper, path: str, num_images: int, score_thresh: float, columns: int) -> str:
    """
    Write to `path` (PNG) the first `num_images` images of DATASETS.TEST[0] with the detections
    of `model`; returns `path`.
    """
    return write_dataset_gallery(model, cfg.DATASETS.TEST[0], mapper, path, num_images, score_thresh, columns)


def write_dataset_gallery(
    model, dataset_name: str, mapper, path: str, num_images: int, score_thresh: float, columns: int
) -> str:
    """
    Write to `path` (PNG) the first `num_images` images of the registered dataset `dataset_name`
    with the detections of `model`; returns `path`.
    """
    dataset_dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)[:num_images]
    drawings = draw_detections(model, mapper, dataset_dicts, MetadataCatalog.get(dataset_name), score_thresh)
    Image.fromarray(tile_images(drawings, columns)).save(path)
    return path
