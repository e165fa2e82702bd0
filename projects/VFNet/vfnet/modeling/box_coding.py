"""
Point-distance box coding used by VFNet: a box is encoded at a location (x, y) as its distances
(l, t, r, b) to the four box sides.
Pure torch (no Detectron2).
"""
import torch
from torch import Tensor


def distances_to_boxes(points: Tensor, distances: Tensor) -> Tensor:
    """
    Args:
        points: (..., 2) locations (x, y).
        distances: (..., 4) distances (l, t, r, b) from each location to the box sides.

    Returns:
        (..., 4) boxes (x1, y1, x2, y2) = (x - l, y - t, x + r, y + b).
    """
    x, y = points.unbind(-1)
    l, t, r, b = distances.unbind(-1)
    return torch.stack([x - l, y - t, x + r, y + b], dim=-1)


def boxes_to_distances(points: Tensor, boxes: Tensor) -> Tensor:
    """
    Inverse of :func:`distances_to_boxes`: (..., 2) points and (..., 4) boxes (x1, y1, x2, y2)
    to (..., 4) distances (l, t, r, b). Negative where a point lies outside its box.
    """
    x, y = points.unbind(-1)
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([x - x1, y - y1, x2 - x, y2 - y], dim=-1)


def aligned_iou(boxes1: Tensor, boxes2: Tensor, eps: float = 1e-6) -> Tensor:
    """
    IoU of each box in `boxes1` with the box at the same index in `boxes2`.

    Args:
        boxes1, boxes2: (N, 4) boxes (x1, y1, x2, y2).
        eps: lower bound of the union, so that degenerate pairs give 0 instead of NaN.

    Returns:
        (N,) IoU values in [0, 1].
    """
    lt = torch.max(boxes1[:, :2], boxes2[:, :2])
    rb = torch.min(boxes1[:, 2:], boxes2[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(dim=1)
    area1 = (boxes1[:, 2:] - boxes1[:, :2]).clamp(min=0).prod(dim=1)
    area2 = (boxes2[:, 2:] - boxes2[:, :2]).clamp(min=0).prod(dim=1)
    return inter / (area1 + area2 - inter).clamp(min=eps)
