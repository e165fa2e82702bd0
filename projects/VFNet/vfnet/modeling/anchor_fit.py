"""
How the boxes of a training set fit the ATSS anchors (one square anchor of ANCHOR_SCALE x stride
per location): boxes much smaller than the smallest anchor (8 x 8 = 64 px on P3 by default) get
few positives of low IoU, and VFNet learns them badly (docs/SMALL_OBJECTS.md has the measured
curve of AP against the anchor scale). Pure numpy (no Detectron2).
"""
from typing import Optional, Sequence

import numpy as np

__all__ = ["ANCHOR_SCALES", "anchor_fit_warning", "resized_box_sides", "suggested_anchor_scale"]

# The anchor scales measured on the small-object shapes set (docs/SMALL_OBJECTS.md).
ANCHOR_SCALES = (8, 6, 4, 3, 2)


def resized_box_sides(
    box_wh: np.ndarray, image_hw: np.ndarray, short_edge: int, max_size: int
) -> np.ndarray:
    """
    The side of each box, sqrt(w x h), after its image is resized as Detectron2's
    ResizeShortestEdge does it: the shorter image side to `short_edge`, the longer at most
    `max_size`.

    Args:
        box_wh: (N, 2) width and height of each box, in the image's pixels.
        image_hw: (N, 2) height and width of the image of each box.
    """
    box_wh = np.asarray(box_wh, dtype=np.float64).reshape(-1, 2)
    image_hw = np.asarray(image_hw, dtype=np.float64).reshape(-1, 2)
    scale = np.minimum(short_edge / image_hw.min(axis=1), max_size / image_hw.max(axis=1))
    return np.sqrt(np.clip(box_wh[:, 0], 0, None) * np.clip(box_wh[:, 1], 0, None)) * scale


def suggested_anchor_scale(box_sides: np.ndarray, stride: int, ratio: float = 4.0) -> int:
    """
    The largest of :data:`ANCHOR_SCALES` whose smallest anchor (scale x `stride`) is at most
    `ratio` x the median side of the boxes smaller than the default anchor's 1 / `ratio`.
    """
    small = box_sides[box_sides < 8 * stride / ratio]
    median = float(np.median(small)) if len(small) else float(np.median(box_sides))
    fitting = [s for s in ANCHOR_SCALES if s * stride <= ratio * median]
    return max(fitting) if fitting else min(ANCHOR_SCALES)


def anchor_fit_warning(
    box_sides: np.ndarray,
    anchor_scale: float,
    stride: int,
    resize: Sequence[int],
    ratio: float = 4.0,
    max_share: float = 0.25,
) -> Optional[str]:
    """
    A warning when more than `max_share` of the boxes (sides after the resize, see
    :func:`resized_box_sides`) are under 1 / `ratio` of the smallest anchor (`anchor_scale` x
    `stride`), naming the share, the key and the suggested value; None when they fit.

    Args:
        resize: (short edge, max size) the sides were computed at, for the message.
    """
    box_sides = np.asarray(box_sides, dtype=np.float64)
    if len(box_sides) == 0:
        return None
    anchor = anchor_scale * stride
    limit = anchor / ratio
    share = float(np.mean(box_sides < limit))
    if share <= max_share:
        return None
    suggested = suggested_anchor_scale(box_sides, stride, ratio)
    advice = (
        f"MODEL.VFNET.ATSS.ANCHOR_SCALE {suggested} (smallest anchor {suggested * stride} px) suits "
        "them better"
        if suggested < anchor_scale
        else "no smaller ATSS anchor was measured to help; a larger input scale "
        "(INPUT.MIN_SIZE_TRAIN, MIN_SIZE_TEST) enlarges them"
    )
    return (
        f"{share:.0%} of the {len(box_sides)} training boxes are smaller than {limit:g} px "
        f"(median {np.median(box_sides):.1f} px; sqrt(w x h) after the resize to "
        f"{resize[0]}, max {resize[1]}), under 1/{ratio:g} of the smallest ATSS anchor, "
        f"{anchor:g} px (MODEL.VFNET.ATSS.ANCHOR_SCALE {anchor_scale:g} x stride {stride}): ATSS "
        f"gives such boxes few positives of low IoU and VFNet learns them badly; {advice} "
        "(docs/SMALL_OBJECTS.md)."
    )
