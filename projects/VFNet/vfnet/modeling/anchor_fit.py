"""
How the boxes of a training set fit VFNet's sample assignment: ATSS over the locations of each
level, P3's grid of 8 px the finest. A box of under ~1.5 strides holds few locations of that
grid (one or none under a stride) and gets few positives or none (ATSS requires the location
inside the box, as FCOS does); the ATSS anchor's scale does not change that (a box inside each of its candidate
anchors is assigned the same at every scale), the input scale does. docs/SMALL_OBJECTS.md has the
measurements. Pure numpy (no Detectron2).
"""
import math
from typing import Optional, Sequence

import numpy as np

__all__ = ["anchor_fit_warning", "resized_box_sides", "suggested_input_scale"]

# Boxes under this many strides of the finest level are "tiny"; the warning is given when more
# than MAX_TINY_SHARE of the training boxes are.
TINY_STRIDES = 1.5
MAX_TINY_SHARE = 0.25


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


def suggested_input_scale(box_sides: np.ndarray, stride: int) -> float:
    """The factor on the input size after which at most MAX_TINY_SHARE of the boxes are under
    TINY_STRIDES x `stride` (their MAX_TINY_SHARE quantile reaches it); at least 1."""
    quantile = float(np.quantile(box_sides, MAX_TINY_SHARE))
    return max(1.0, TINY_STRIDES * stride / max(quantile, 1e-6))


def anchor_fit_warning(
    box_sides: np.ndarray, stride: int, resize: Sequence[int], multiple: int = 32
) -> Optional[str]:
    """
    A warning when more than MAX_TINY_SHARE of the boxes (sides after the resize, see
    :func:`resized_box_sides`) are under TINY_STRIDES x `stride` (the finest level's), naming
    the share, the keys and the suggested input sizes (`resize` x :func:`suggested_input_scale`,
    rounded up to a `multiple`); None when they fit.

    Args:
        resize: (short edge, max size) the sides were computed at.
    """
    box_sides = np.asarray(box_sides, dtype=np.float64)
    if len(box_sides) == 0:
        return None
    limit = TINY_STRIDES * stride
    share = float(np.mean(box_sides < limit))
    if share <= MAX_TINY_SHARE:
        return None
    factor = suggested_input_scale(box_sides, stride)
    short, longest = (int(math.ceil(v * factor / multiple)) * multiple for v in resize)
    return (
        f"{share:.0%} of the {len(box_sides)} training boxes are under {limit:g} px (median "
        f"{np.median(box_sides):.1f} px; sqrt(w x h) after the resize to {resize[0]}, max "
        f"{resize[1]}), {TINY_STRIDES:g} x the stride of the finest level ({stride} px): such a box "
        "holds few locations of its grid (one or none under a stride) and gets few positives or "
        "none (ATSS, as FCOS, needs the location inside the box); MODEL.VFNET.ATSS.ANCHOR_SCALE "
        f"does not change that. Enlarge the input about {factor:.1f}x: INPUT.MIN_SIZE_TRAIN ({short},), "
        f"MAX_SIZE_TRAIN {longest}, MIN_SIZE_TEST {short}, MAX_SIZE_TEST {longest} (see "
        "docs/SMALL_OBJECTS.md)."
    )
