"""
Losses of VarifocalNet: the varifocal loss on IoU-aware classification scores and the
IoU-weighted GIoU loss on boxes; GFL's quality focal loss, the comparison on the same targets.
Pure torch (no Detectron2).
"""
from typing import Tuple
import torch
from fvcore.nn import giou_loss
from torch import Tensor
from torch.nn import functional as F

from .box_coding import aligned_iou

# The classification losses a detector of this project can train with: the focal loss on one-hot
# labels, and the varifocal and quality focal losses on IoU-aware targets.
CLS_LOSS_TYPES = ("focal", "varifocal", "quality_focal")


def check_cls_loss_type(cls_loss_type: str, keys: str) -> str:
    """`cls_loss_type` if it is one of CLS_LOSS_TYPES, else a ValueError naming the config `keys`."""
    if cls_loss_type not in CLS_LOSS_TYPES:
        raise ValueError(
            f"Unknown classification loss '{cls_loss_type}' ({keys}): expected one of {CLS_LOSS_TYPES}."
        )
    return cls_loss_type


def varifocal_loss(
    logits: Tensor, targets: Tensor, alpha: float = 0.75, gamma: float = 2.0, iou_weighted: bool = True,
    reduction: str = "sum",
) -> Tensor:
    """
    Varifocal loss (VarifocalNet, eq. 2), computed in float32 from low-precision logits.

    For a target q > 0 (the IoU of a positive location with its box, at its class) the loss is
    the binary cross-entropy of p = sigmoid(logit) against q, weighted by q (by 1 when
    `iou_weighted` is False). For q = 0 it is the BCE against 0 down-weighted by
    alpha * p ** gamma, as in the focal loss, so easy negatives contribute little.

    Args:
        logits: (..., K) classification logits.
        targets: (..., K) IoU-aware targets q in [0, 1], same shape as `logits`.
        reduction: "none", "sum" or "mean".

    Returns:
        The loss, elementwise for reduction "none", else a scalar.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.dtype)
    p = logits.sigmoid()
    positive = targets > 0
    pos_weight = targets if iou_weighted else torch.ones_like(targets)
    neg_weight = alpha * (p - targets).abs().pow(gamma)
    weight = torch.where(positive, pos_weight, neg_weight)
    loss = F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    if reduction == "none":
        return loss
    raise ValueError(f"Unknown reduction '{reduction}': expected 'none', 'sum' or 'mean'.")


def quality_focal_loss(logits: Tensor, targets: Tensor, beta: float = 2.0) -> Tensor:
    """
    Quality focal loss (Li et al., "Generalized Focal Loss", eq. 5), summed, in float32.

    The binary cross-entropy of p = sigmoid(logit) against the IoU-aware target q, weighted by
    |q - p| ** beta: the same modulation for positives (q > 0) and negatives (q = 0).

    Args:
        logits: (..., K) classification logits.
        targets: (..., K) targets q in [0, 1], same shape as `logits`.

    Returns:
        Scalar, the sum over all elements.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    targets = targets.to(logits.dtype)
    weight = (targets - logits.sigmoid()).abs().pow(beta)
    return (F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * weight).sum()


def iou_weighted_giou_loss(pred_boxes: Tensor, target_boxes: Tensor) -> Tuple[Tensor, Tensor]:
    """
    GIoU loss of each predicted box, weighted by its own IoU with its target.

    Args:
        pred_boxes: (N, 4) predicted boxes (x1, y1, x2, y2).
        target_boxes: (N, 4) their target boxes.

    Returns:
        loss_sum: scalar, sum_i w_i * (1 - GIoU_i), in float32 for low-precision boxes.
        weights: (N,) w_i = IoU_i, detached and clamped to at least 1e-6. The caller divides
            `loss_sum` by the sum of the weights (averaged over workers).
    """
    pred_boxes = pred_boxes.to(torch.promote_types(pred_boxes.dtype, torch.float32))
    target_boxes = target_boxes.to(pred_boxes.dtype)
    weights = aligned_iou(pred_boxes.detach(), target_boxes).clamp(min=1e-6)
    loss = giou_loss(pred_boxes, target_boxes, reduction="none")
    return (loss * weights).sum(), weights
