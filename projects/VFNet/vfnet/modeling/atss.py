"""
Adaptive Training Sample Selection (Zhang et al., "Bridging the Gap Between Anchor-based and
Anchor-free Detection via Adaptive Training Sample Selection", CVPR 2020).
Pure torch (no Detectron2).
"""
from typing import List, Optional, Tuple
import torch
from torch import Tensor
from torchvision.ops import box_iou


class ATSSMatcher:
    """
    Assigns each anchor to at most one ground-truth box:

    1. per box and per level, the `topk` anchors whose centers are nearest (L2) to the box center
       are candidates;
    2. the IoU threshold of a box is the mean plus the (unbiased) standard deviation of its
       candidates' IoUs;
    3. candidates at or above the threshold whose center lies inside the box (by more than
       0.01 pixel) are positives;
    4. an anchor that is positive for several boxes takes the one with the highest IoU.

    With `size_divisor` > 0, only the anchors of the image's own extent take part (MMDetection's
    `valid_flags(pad_shape)`): those whose center lies in the image padded to a multiple of
    `size_divisor`; the others, which exist because a larger image of the batch padded it, stay
    negative. With 0, every anchor of the padded batch takes part.

    It is a pure function of tensors, vectorised over boxes: memory grows with
    #anchors x #boxes, time has no Python loop over boxes.
    """

    def __init__(self, topk: int = 9, size_divisor: int = 32):
        self.topk = topk
        self.size_divisor = size_divisor

    @torch.no_grad()
    def __call__(
        self,
        anchors: Tensor,
        num_anchors_per_level: List[int],
        gt_boxes: Tensor,
        image_size: Optional[Tuple[int, int]] = None,
    ) -> Tensor:
        """
        Args:
            anchors: (R, 4) anchor boxes (x1, y1, x2, y2) of all levels, concatenated level by
                level.
            num_anchors_per_level: number of anchors of each level; they sum to R.
            gt_boxes: (M, 4) ground-truth boxes (x1, y1, x2, y2) of one image.
            image_size: (height, width) of the image before padding; None: every anchor takes
                part, as with `size_divisor` 0.

        Returns:
            (R,) int64: index into `gt_boxes` of the box each anchor is assigned to, or -1 for
            a negative anchor.
        """
        if self.size_divisor <= 0 or image_size is None:
            return self.assign(anchors, num_anchors_per_level, gt_boxes)
        valid = inside_padded_image(anchors, image_size, self.size_divisor)
        num_valid_per_level = [int(v.sum()) for v in valid.split(num_anchors_per_level)]
        matched = torch.full_like(valid, -1, dtype=torch.int64)
        matched[valid] = self.assign(anchors[valid], num_valid_per_level, gt_boxes)
        return matched

    def assign(
        self, anchors: Tensor, num_anchors_per_level: List[int], gt_boxes: Tensor
    ) -> Tensor:
        """Steps 1-4 over all of `anchors`; arguments and result as :meth:`__call__`."""
        num_anchors, num_gt = anchors.shape[0], gt_boxes.shape[0]
        matched = torch.full((num_anchors,), -1, dtype=torch.int64, device=anchors.device)
        if num_gt == 0 or num_anchors == 0:
            return matched

        ious = box_iou(anchors, gt_boxes)  # (R, M)
        anchor_centers = (anchors[:, :2] + anchors[:, 2:]) / 2
        gt_centers = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2
        distances = torch.cdist(
            anchor_centers, gt_centers, compute_mode="donot_use_mm_for_euclid_dist"
        )  # (R, M), computed directly: the matmul shortcut reorders near ties

        candidates = []
        start = 0
        for num in num_anchors_per_level:
            _, idx = distances[start : start + num].topk(min(self.topk, num), dim=0, largest=False)
            candidates.append(idx + start)
            start += num
        candidates = torch.cat(candidates, dim=0)  # (C, M)

        gt_idx = torch.arange(num_gt, device=anchors.device).expand_as(candidates)
        candidate_ious = ious[candidates, gt_idx]  # (C, M)
        threshold = candidate_ious.mean(dim=0) + candidate_ious.std(dim=0)
        is_pos = candidate_ious >= threshold

        centers = anchor_centers[candidates]  # (C, M, 2)
        inside = torch.cat(
            [centers - gt_boxes[None, :, :2], gt_boxes[None, :, 2:] - centers], dim=2
        )
        is_pos &= inside.min(dim=2).values > 0.01

        pos_ious = torch.full_like(ious, -1.0)
        pos_ious[candidates[is_pos], gt_idx[is_pos]] = ious[candidates[is_pos], gt_idx[is_pos]]
        best_iou, best_gt = pos_ious.max(dim=1)
        return torch.where(best_iou >= 0, best_gt, matched)


def inside_padded_image(anchors: Tensor, image_size: Tuple[int, int], size_divisor: int) -> Tensor:
    """
    Args:
        anchors: (R, 4) anchor boxes (x1, y1, x2, y2).
        image_size: (height, width) of the image before padding.
        size_divisor: the image is padded to a multiple of it.

    Returns:
        (R,) bool: whether the anchor's center lies in the padded image (x < padded width,
        y < padded height). For anchors centered on the grid points i x stride (offset 0), it is
        MMDetection's valid flag of the point: i < min(ceil(padded size / stride), grid size).
    """
    pad_h, pad_w = (-(-s // size_divisor) * size_divisor for s in image_size)
    centers = (anchors[:, :2] + anchors[:, 2:]) / 2
    return (centers[:, 0] < pad_w) & (centers[:, 1] < pad_h)
