"""
Detectron2's RetinaNet and FCOS trained with an IoU-aware classification loss: the varifocal loss
(VarifocalNet, Table 5; the official heads' `use_vfl`) or GFL's quality focal loss, in place of
the focal loss. The target of a positive anchor at its class is the IoU of its decoded predicted
box with its ground-truth box; 0 elsewhere. Detectron2's matching, box coding, box losses,
normalisation and inference are used unchanged.
"""
from typing import List
import torch
from torch import Tensor
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.modeling.meta_arch.fcos import FCOS
from detectron2.modeling.meta_arch.retinanet import RetinaNet
from detectron2.structures import Boxes

from ..box_coding import aligned_iou
from ..losses import check_cls_loss_type, quality_focal_loss, varifocal_loss

__all__ = ["IoUAwareRetinaNet", "IoUAwareFCOS", "iou_aware_targets"]


def iou_aware_targets(
    pred_boxes: Tensor, gt_boxes: Tensor, gt_labels: Tensor, num_classes: int
) -> Tensor:
    """
    Args:
        pred_boxes: (N, R, 4) decoded predicted boxes of the R anchors of N images.
        gt_boxes: (N, R, 4) the ground-truth box matched to each anchor.
        gt_labels: (N, R) labels in {-1 (ignored), 0..K-1 (positive), K (background)}.

    Returns:
        (N, R, K) the IoU of each positive's predicted box with its ground truth at the
        positive's class, 0 at every other class and anchor.
    """
    iou = aligned_iou(pred_boxes.reshape(-1, 4), gt_boxes.reshape(-1, 4)).view(gt_labels.shape)
    positive = (gt_labels >= 0) & (gt_labels < num_classes)
    labels = torch.where(positive, gt_labels, torch.full_like(gt_labels, num_classes))
    one_hot = F.one_hot(labels, num_classes + 1)[..., :num_classes]
    return one_hot.to(iou.dtype) * iou[..., None]


class _IoUAwareClassification:
    """
    The classification loss shared by the two detectors. `losses` first runs Detectron2's own
    (its box losses and the EMA of the number of positives, `self.loss_normalizer`), then replaces
    its focal term when `cls_loss_type` is not "focal".
    """

    def _init_cls_loss(self, cls_loss_type, vfl_alpha, vfl_gamma, vfl_iou_weighted, qfl_beta):
        self.cls_loss_type = check_cls_loss_type(
            cls_loss_type, "MODEL.RETINANET.CLS_LOSS_TYPE or the lazy config's model.cls_loss_type"
        )
        self.vfl_alpha = vfl_alpha
        self.vfl_gamma = vfl_gamma
        self.vfl_iou_weighted = vfl_iou_weighted
        self.qfl_beta = qfl_beta

    def iou_aware_cls_loss(
        self,
        anchors: List[Boxes],
        pred_logits: List[Tensor],
        gt_labels: List[Tensor],
        pred_anchor_deltas: List[Tensor],
        gt_boxes: List[Tensor],
    ) -> Tensor:
        """
        The varifocal or quality focal loss, summed over the anchors not ignored (label -1),
        unnormalised. Arguments as :meth:`RetinaNet.losses`: per level (N, Hi*Wi*A, K) logits and
        (N, Hi*Wi*A, 4) deltas; per image (R,) labels and (R, 4) matched boxes.
        """
        gt_labels = torch.stack(gt_labels)  # (N, R)
        anchors = Boxes.cat(anchors).tensor  # (R, 4)
        deltas = cat(pred_anchor_deltas, dim=1).detach()  # (N, R, 4)
        pred_boxes = torch.stack([self.box2box_transform.apply_deltas(d, anchors) for d in deltas])
        targets = iou_aware_targets(pred_boxes, torch.stack(gt_boxes), gt_labels, self.num_classes)
        valid = gt_labels >= 0
        logits = cat(pred_logits, dim=1)[valid]
        if self.cls_loss_type == "varifocal":
            return varifocal_loss(
                logits, targets[valid], self.vfl_alpha, self.vfl_gamma, self.vfl_iou_weighted
            )
        return quality_focal_loss(logits, targets[valid], self.qfl_beta)


@META_ARCH_REGISTRY.register()
class IoUAwareRetinaNet(_IoUAwareClassification, RetinaNet):
    """
    Detectron2's RetinaNet with MODEL.RETINANET.CLS_LOSS_TYPE "focal" (Detectron2's loss),
    "varifocal" or "quality_focal"; with MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS, MMDetection's
    post-processing order (for its converted weights).
    """

    @configurable
    def __init__(
        self,
        *,
        cls_loss_type: str = "varifocal",
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        vfl_iou_weighted: bool = True,
        qfl_beta: float = 2.0,
        clip_boxes_before_nms: bool = False,
        **kwargs,
    ):
        """
        Args:
            cls_loss_type: "focal", "varifocal" or "quality_focal".
            vfl_alpha, vfl_gamma, vfl_iou_weighted: arguments of `varifocal_loss`.
            qfl_beta: the exponent of `quality_focal_loss`.
            clip_boxes_before_nms: clip the decoded candidates to the image and drop the empty
                ones before the NMS, as MMDetection's RetinaHead (Detectron2 clips after it).
            Other arguments as :class:`RetinaNet`.
        """
        super().__init__(**kwargs)
        self._init_cls_loss(cls_loss_type, vfl_alpha, vfl_gamma, vfl_iou_weighted, qfl_beta)
        self.clip_boxes_before_nms = clip_boxes_before_nms

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        c = cfg.MODEL.RETINANET
        ret.update(
            cls_loss_type=c.CLS_LOSS_TYPE,
            vfl_alpha=c.VFL_ALPHA,
            vfl_gamma=c.VFL_GAMMA,
            vfl_iou_weighted=c.VFL_IOU_WEIGHTED,
            qfl_beta=c.QFL_BETA,
            clip_boxes_before_nms=c.CLIP_BOXES_BEFORE_NMS,
        )
        return ret

    def _decode_per_level_predictions(self, anchors, pred_scores, pred_deltas, *args):
        pred = super()._decode_per_level_predictions(anchors, pred_scores, pred_deltas, *args)
        if self.clip_boxes_before_nms:
            # Boxes of non-finite predictions are no detections (the clip would assert on them).
            pred = pred[torch.isfinite(pred.pred_boxes.tensor).all(dim=1)]
            pred.pred_boxes.clip(pred.image_size)
            pred = pred[pred.pred_boxes.nonempty(threshold=0.0)]
        return pred

    def losses(self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes):
        losses = super().losses(anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes)
        if self.cls_loss_type != "focal":
            loss_cls = self.iou_aware_cls_loss(
                anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes
            )
            losses["loss_cls"] = loss_cls / self.loss_normalizer
        return losses


class IoUAwareFCOS(_IoUAwareClassification, FCOS):
    """
    Detectron2's FCOS with `cls_loss_type` "focal" (Detectron2's loss), "varifocal" or
    "quality_focal". The centerness branch is kept, trained and multiplied into the scores at
    inference as in Detectron2's FCOS, as the official ATSS + VFL head (ATSSVGFLHead) keeps its own.
    """

    def __init__(
        self, *, cls_loss_type: str = "varifocal", vfl_alpha: float = 0.75, vfl_gamma: float = 2.0,
        vfl_iou_weighted: bool = True, qfl_beta: float = 2.0, **kwargs,
    ):
        """Arguments as :class:`IoUAwareRetinaNet`, and :class:`FCOS`'s."""
        super().__init__(**kwargs)
        self._init_cls_loss(cls_loss_type, vfl_alpha, vfl_gamma, vfl_iou_weighted, qfl_beta)

    def losses(
        self, anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
    ):
        losses = super().losses(
            anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes, pred_centerness
        )
        if self.cls_loss_type != "focal":
            loss_cls = self.iou_aware_cls_loss(
                anchors, pred_logits, gt_labels, pred_anchor_deltas, gt_boxes
            )
            losses["loss_fcos_cls"] = loss_cls / self.loss_normalizer
        return losses
