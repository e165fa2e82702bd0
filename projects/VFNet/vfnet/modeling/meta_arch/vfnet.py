"""
VarifocalNet (Zhang et al., "VarifocalNet: An IoU-aware Dense Object Detector", CVPR 2021) as a
Detectron2 dense detector.
"""
import logging
from contextlib import nullcontext
from typing import Any, Dict, List, Optional, Tuple
import torch
import torch.distributed as dist
from fvcore.nn import sigmoid_focal_loss_jit
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import batched_nms, cat
from detectron2.modeling import META_ARCH_REGISTRY, Backbone, build_backbone
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransformLinear
from detectron2.modeling.meta_arch.dense_detector import DenseDetector
from detectron2.structures import Boxes, ImageList, Instances
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ...layers.soft_nms import batched_soft_nms
from ..atss import ATSSMatcher
from ..box_coding import distances_to_boxes
from ..losses import check_cls_loss_type, iou_weighted_giou_loss, quality_focal_loss, varifocal_loss
from ..vfnet_head import VFNetHead, feature_memory_format
from .non_finite import first_non_finite

__all__ = ["VFNet"]

logger = logging.getLogger(__name__)


def mean_over_workers(value: Tensor) -> float:
    """The mean of a scalar tensor over all workers (itself when not distributed)."""
    world_size = comm.get_world_size()
    if world_size > 1:
        value = value.detach().clone().double()
        dist.all_reduce(value)
        value = value / world_size
    return float(value)


AUTOCAST_DTYPES = ("bfloat16", "float16")


def soft_nms_arguments(cfg) -> Optional[Dict[str, Any]]:
    """The arguments of `batched_soft_nms` of MODEL.VFNET.TEST_NMS_TYPE "soft_nms", else None."""
    v = cfg.MODEL.VFNET
    if v.TEST_NMS_TYPE == "nms":
        return None
    if v.TEST_NMS_TYPE != "soft_nms":
        raise ValueError(f'MODEL.VFNET.TEST_NMS_TYPE is "{v.TEST_NMS_TYPE}": use "nms" or "soft_nms".')
    return {"method": v.SOFT_NMS.METHOD, "sigma": v.SOFT_NMS.SIGMA, "min_score": v.SOFT_NMS.MIN_SCORE}


def class_wise_nms(
    boxes: Tensor,
    scores: Tensor,
    classes: Tensor,
    nms_thresh: float,
    max_detections: int,
    soft_nms: Optional[Dict[str, Any]] = None,
) -> Tuple[Tensor, Tensor]:
    """
    The class-wise NMS of inference and the top `max_detections`: Detectron2's `batched_nms`,
    or `batched_soft_nms` with the arguments `soft_nms` (see :func:`soft_nms_arguments`).

    Args:
        boxes: (R, 4) XYXY; scores, classes: (R,).

    Returns:
        the indices kept, by decreasing score, and their scores (decayed by soft-NMS).
    """
    if soft_nms is None:
        keep = batched_nms(boxes, scores, classes, nms_thresh)[:max_detections]
        return keep, scores[keep]
    keep, kept_scores = batched_soft_nms(
        boxes, scores, classes, nms_thresh, max_num=max_detections, **soft_nms
    )
    return keep, kept_scores.to(scores.dtype)


def inference_autocast_dtype(cfg) -> Optional[torch.dtype]:
    """The dtype of TEST.AMP (inference under autocast), or None when it is off."""
    if not cfg.TEST.AMP.ENABLED:
        return None
    if cfg.TEST.AMP.DTYPE not in AUTOCAST_DTYPES:
        raise ValueError(
            f"TEST.AMP.DTYPE must be one of {AUTOCAST_DTYPES}, got '{cfg.TEST.AMP.DTYPE}'."
        )
    return getattr(torch, cfg.TEST.AMP.DTYPE)


@META_ARCH_REGISTRY.register()
class VFNet(DenseDetector):
    """
    Implement VarifocalNet: ATSS sample assignment, varifocal loss on IoU-aware classification
    scores, GIoU losses on the initial and the refined boxes.
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        head: nn.Module,
        head_in_features: List[str],
        anchor_generator: nn.Module,
        anchor_matcher: ATSSMatcher,
        num_classes: int,
        cls_loss_type: str = "varifocal",
        vfl_alpha: float = 0.75,
        vfl_gamma: float = 2.0,
        iou_weighted: bool = True,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
        qfl_beta: float = 2.0,
        loss_bbox_weight: float = 1.5,
        loss_bbox_refine_weight: float = 2.0,
        test_score_thresh: float = 0.05,
        test_topk_candidates: int = 1000,
        test_nms_thresh: float = 0.6,
        test_soft_nms: Optional[Dict[str, Any]] = None,
        max_detections_per_image: int = 100,
        test_autocast_dtype: Optional[torch.dtype] = None,
        pixel_mean,
        pixel_std,
    ):
        """
        Args:
            backbone, head_in_features, pixel_mean, pixel_std: see :class:`DenseDetector`.
            head: a :class:`VFNetHead`.
            anchor_generator: one square anchor per location, centered on the location; the
                anchors are used by ATSS, their centers are the locations boxes are decoded from.
            anchor_matcher: an :class:`ATSSMatcher`.
            num_classes: number of object classes.
            cls_loss_type: the classification loss: "varifocal" on the IoU-aware targets (the
                IoU of each positive's final box with its ground truth, at its class); "focal"
                on the ATSS labels (one-hot); "quality_focal", GFL's, on the IoU-aware targets.
            vfl_alpha, vfl_gamma, iou_weighted: see :func:`varifocal_loss`.
            focal_alpha, focal_gamma: parameters of the focal loss.
            qfl_beta: see :func:`quality_focal_loss`.
            loss_bbox_weight, loss_bbox_refine_weight: weights of the GIoU losses of the initial
                and the refined boxes.
            test_score_thresh, test_topk_candidates: per level, keep the (location, class)
                scores above the threshold, at most the top k of them.
            test_nms_thresh: IoU threshold of the class-wise NMS.
            test_soft_nms: None: the NMS is Detectron2's `batched_nms`; else it is
                :func:`batched_soft_nms` with these arguments (method, sigma, min_score), which
                also decays the scores (VFNet-X's soft-NMS).
            max_detections_per_image: detections kept per image after NMS.
            test_autocast_dtype: run the backbone and the head of inference under autocast to
                this dtype (bfloat16 on CPU, float16 or bfloat16 on CUDA); the
                post-processing stays in float32. None: no autocast.
        """
        super().__init__(
            backbone, head, head_in_features, pixel_mean=pixel_mean, pixel_std=pixel_std
        )
        self.num_classes = num_classes
        self.anchor_generator = anchor_generator
        self.anchor_matcher = anchor_matcher
        # Decodes distances (l, t, r, b) from the anchor centers, i.e. from the locations.
        self.box2box_transform = Box2BoxTransformLinear(normalize_by_size=False)

        self.cls_loss_type = check_cls_loss_type(cls_loss_type, "MODEL.VFNET.CLS_LOSS_TYPE")
        self.vfl_alpha = vfl_alpha
        self.vfl_gamma = vfl_gamma
        self.iou_weighted = iou_weighted
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.qfl_beta = qfl_beta
        self.loss_bbox_weight = loss_bbox_weight
        self.loss_bbox_refine_weight = loss_bbox_refine_weight

        self.test_score_thresh = test_score_thresh
        self.test_topk_candidates = test_topk_candidates
        self.test_nms_thresh = test_nms_thresh
        self.test_soft_nms = test_soft_nms
        self.max_detections_per_image = max_detections_per_image
        self.test_autocast_dtype = test_autocast_dtype

    @classmethod
    def from_config(cls, cfg):
        v = cfg.MODEL.VFNET
        backbone = build_backbone(cfg)
        backbone_shape = backbone.output_shape()
        missing = [f for f in v.IN_FEATURES if f not in backbone_shape]
        if missing:
            raise ValueError(
                f"MODEL.VFNET.IN_FEATURES names {missing}, which the backbone "
                f"'{cfg.MODEL.BACKBONE.NAME}' does not produce (it has {sorted(backbone_shape)})."
            )
        feature_shapes = [backbone_shape[f] for f in v.IN_FEATURES]
        strides = [s.stride for s in feature_shapes]
        return {
            "backbone": backbone,
            "head": VFNetHead(cfg, feature_shapes),
            "head_in_features": v.IN_FEATURES,
            "anchor_generator": DefaultAnchorGenerator(
                sizes=[[v.ATSS.ANCHOR_SCALE * s] for s in strides],
                aspect_ratios=[1.0],
                strides=strides,
                offset=0.0,
            ),
            "anchor_matcher": ATSSMatcher(v.ATSS.TOPK, v.ATSS.SIZE_DIVISOR),
            "num_classes": v.NUM_CLASSES,
            "cls_loss_type": v.CLS_LOSS_TYPE,
            "vfl_alpha": v.VFL_ALPHA,
            "vfl_gamma": v.VFL_GAMMA,
            "iou_weighted": v.IOU_WEIGHTED,
            "focal_alpha": v.FOCAL_ALPHA,
            "focal_gamma": v.FOCAL_GAMMA,
            "qfl_beta": v.QFL_BETA,
            "loss_bbox_weight": v.LOSS_BBOX_WEIGHT,
            "loss_bbox_refine_weight": v.LOSS_BBOX_REFINE_WEIGHT,
            "test_score_thresh": v.TEST_SCORE_THRESH,
            "test_topk_candidates": v.TEST_TOPK_CANDIDATES,
            "test_nms_thresh": v.TEST_NMS_THRESH,
            "test_soft_nms": soft_nms_arguments(cfg),
            "max_detections_per_image": v.TEST_DETECTIONS_PER_IMAGE,
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "test_autocast_dtype": inference_autocast_dtype(cfg),
        }

    def _inference_autocast(self):
        """The autocast of TEST.AMP in inference, else a no-op context."""
        # (a disabled torch.autocast would undo a caller's autocast)
        if not self.training and self.test_autocast_dtype is not None:
            return torch.autocast(self.device.type, self.test_autocast_dtype)
        return nullcontext()

    def forward(self, batched_inputs: List[Dict[str, Tensor]]):
        """Detectron2's DenseDetector.forward, in inference under TEST.AMP's autocast."""
        with self._inference_autocast():
            return super().forward(batched_inputs)

    def preprocess_image(self, batched_inputs: List[Dict[str, Tensor]]) -> ImageList:
        """Detectron2's normalised and padded batch, in the memory format the model computes in
        on its device (:func:`feature_memory_format`: channels-last on CPU, where the backbone's
        convolutions then run without oneDNN's layout reorders)."""
        images = super().preprocess_image(batched_inputs)
        images.tensor = images.tensor.contiguous(memory_format=feature_memory_format(images.tensor.device))
        return images

    def forward_training(self, images, features, predictions, gt_instances):
        logits, boxes_init, boxes_refine = predictions
        logits, boxes_init, boxes_refine = self._transpose_dense_predictions(
            [logits, boxes_init, boxes_refine], [self.num_classes, 4, 4]
        )
        anchors = self.anchor_generator(features)
        gt_labels, gt_boxes = self.label_anchors(anchors, gt_instances, images.image_sizes)
        losses = self.losses(anchors, logits, boxes_init, boxes_refine, gt_labels, gt_boxes)
        # A non-finite ground-truth box would be assigned no location by ATSS and vanish from
        # the losses: it makes them non-finite instead, for the trainer's check of the losses to
        # report (vfnet/engine/train_loop.py), without a host synchronisation here.
        poison = sum((x.gt_boxes.tensor - x.gt_boxes.tensor).sum() for x in gt_instances)
        return {k: v + poison for k, v in losses.items()}

    @torch.no_grad()
    def locate_non_finite(self, batched_inputs: List[Dict[str, Tensor]]) -> Tuple[str, Optional[int]]:
        """
        Where a non-finite value first appears in the training step of `batched_inputs` (the
        inputs, the parameters, the features, the head's outputs): what the trainer reports
        once a loss is not finite (see :func:`first_non_finite`).
        """
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        features = [features[f] for f in self.head_in_features]
        predictions = self.head(features)
        return first_non_finite(
            self, images, features, predictions, gt_instances, self.head_in_features
        )

    @torch.no_grad()
    def label_anchors(
        self,
        anchors: List[Boxes],
        gt_instances: List[Instances],
        image_sizes: List[Tuple[int, int]],
    ) -> Tuple[List[Tensor], List[Tensor]]:
        """
        Assign the locations of every image with ATSS, over the image's own (height, width)
        `image_sizes` (before padding) as the matcher's size divisor gives it.

        Returns:
            gt_labels: per image, (R,) class of the box assigned to each location, or
                `num_classes` for a negative location.
            gt_boxes: per image, (R, 4) the box assigned to each location (zeros for negatives).
        """
        num_anchors_per_level = [len(a) for a in anchors]
        anchors = Boxes.cat(anchors).tensor
        gt_labels, gt_boxes = [], []
        for inst, image_size in zip(gt_instances, image_sizes):
            boxes = inst.gt_boxes.tensor
            matched = self.anchor_matcher(anchors, num_anchors_per_level, boxes, image_size)
            if len(inst) > 0:
                labels = inst.gt_classes[matched.clamp(min=0)]
                labels[matched < 0] = self.num_classes
                gt_boxes.append(boxes[matched.clamp(min=0)])
            else:
                labels = torch.full_like(matched, self.num_classes)
                gt_boxes.append(torch.zeros_like(anchors))
            gt_labels.append(labels)
        return gt_labels, gt_boxes

    def losses(self, anchors, logits, boxes_init, boxes_refine, gt_labels, gt_boxes):
        """
        Args:
            anchors: per level, Boxes of the level's anchors.
            logits: per level, (N, Ri, K) classification logits.
            boxes_init, boxes_refine: per level, (N, Ri, 4) predicted distances; `boxes_refine`
                is empty when refinement is off.
            gt_labels, gt_boxes: output of :meth:`label_anchors`.

        Returns:
            dict with "loss_cls", "loss_bbox" and, with refinement, "loss_bbox_refine".
        """
        num_images = len(gt_labels)
        gt_labels = torch.stack(gt_labels)  # (N, R)
        gt_boxes = torch.stack(gt_boxes)  # (N, R, 4)
        pos_mask = gt_labels != self.num_classes
        num_pos = pos_mask.sum()
        get_event_storage().put_scalar("num_pos_anchors", num_pos.item() / num_images)
        normalizer = max(mean_over_workers(num_pos), 1.0)

        points = Boxes.cat(anchors).get_centers()[None].expand(num_images, -1, -1)[pos_mask]
        target_boxes = gt_boxes[pos_mask]

        def box_loss(distances: List[Tensor], weight: float):
            pred_boxes = distances_to_boxes(points, cat(distances, dim=1)[pos_mask])
            # fvcore's giou_loss asserts on non-finite boxes: they are replaced by their targets,
            # and the loss made non-finite for the trainer's check (no host synchronisation).
            finite = torch.isfinite(pred_boxes).all(dim=1, keepdim=True)
            loss_sum, ious = iou_weighted_giou_loss(
                torch.where(finite, pred_boxes, target_boxes), target_boxes
            )
            loss_sum = loss_sum + (pred_boxes - pred_boxes).sum()  # 0, or NaN
            return weight * loss_sum / max(mean_over_workers(ious.sum()), 1.0), ious

        losses = {}
        losses["loss_bbox"], ious = box_loss(boxes_init, self.loss_bbox_weight)
        if boxes_refine:
            losses["loss_bbox_refine"], ious = box_loss(boxes_refine, self.loss_bbox_refine_weight)

        logits = cat(logits, dim=1)
        if self.cls_loss_type != "focal":
            # IoU-aware targets: the IoU of the final box with its ground truth, at its class.
            targets = torch.zeros_like(logits, dtype=ious.dtype)
            pos_image, pos_location = pos_mask.nonzero(as_tuple=True)
            targets[pos_image, pos_location, gt_labels[pos_mask]] = ious
            if self.cls_loss_type == "varifocal":
                loss_cls = varifocal_loss(
                    logits, targets, self.vfl_alpha, self.vfl_gamma, self.iou_weighted, reduction="sum"
                )
            else:
                loss_cls = quality_focal_loss(logits, targets, self.qfl_beta)
        else:
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            targets = F.one_hot(gt_labels, self.num_classes + 1)[..., :-1].to(logits.dtype)
            loss_cls = sigmoid_focal_loss_jit(
                logits, targets, self.focal_alpha, self.focal_gamma, reduction="sum"
            )
        losses["loss_cls"] = loss_cls / normalizer
        return losses

    @torch.no_grad()
    def inference_candidates(self, batched_inputs: List[Dict[str, Tensor]]) -> List[Instances]:
        """
        The detections of each input image before the class-wise NMS, in the coordinates of the
        input image (not rescaled to its "height" and "width"): what :meth:`forward` computes in
        inference up to the NMS (per level the scores above TEST_SCORE_THRESH, at most
        TEST_TOPK_CANDIDATES of them, boxes clipped to the image, empty boxes dropped), sorted
        by level then score. Test-time augmentation merges these over the augmented views
        (:class:`vfnet.modeling.test_time_augmentation.VFNetWithTTA`). Call in eval mode.
        """
        with self._inference_autocast():
            images = self.preprocess_image(batched_inputs)
            features = self.backbone(images.tensor)
            features = [features[f] for f in self.head_in_features]
            predictions = self.head(features)
            return self.forward_inference(images, features, predictions, nms=False)

    def forward_inference(
        self,
        images: ImageList,
        features: List[Tensor],
        predictions: List[List[Tensor]],
        nms: bool = True,
    ) -> List[Instances]:
        # Scores, box decoding and NMS in float32 (the predictions may be of an autocast dtype).
        logits, boxes_init, boxes_refine = (
            [x.to(torch.promote_types(x.dtype, torch.float32)) for x in p] for p in predictions
        )
        logits, boxes = self._transpose_dense_predictions(
            [logits, boxes_refine or boxes_init], [self.num_classes, 4]
        )
        anchors = self.anchor_generator(features)
        results = []
        with torch.autocast(images.tensor.device.type, enabled=False):
            for img_idx, image_size in enumerate(images.image_sizes):
                scores = [x[img_idx].sigmoid() for x in logits]
                distances = [x[img_idx] for x in boxes]
                results.append(
                    self.inference_single_image(anchors, scores, distances, image_size, nms)
                )
        return results

    def inference_single_image(
        self,
        anchors: List[Boxes],
        scores: List[Tensor],
        distances: List[Tensor],
        image_size: Tuple[int, int],
        nms: bool = True,
    ) -> Instances:
        """
        Args:
            anchors: per level, Boxes of the level's anchors (their centers are the locations).
            scores: per level, (Ri, K) scores in [0, 1].
            distances: per level, (Ri, 4) predicted distances (l, t, r, b).
            image_size: (height, width) of the image before padding.
            nms: False: return the candidates before the class-wise NMS and the top
                TEST_DETECTIONS_PER_IMAGE (for test-time augmentation).

        Returns:
            Instances with pred_boxes (clipped to the image), scores and pred_classes.
        """
        pred = self._decode_multi_level_predictions(
            anchors,
            scores,
            distances,
            self.test_score_thresh,
            self.test_topk_candidates,
            image_size,
        )
        # A box decoded from a non-finite distance (a diverged model, a non-finite input) is no
        # detection: it is dropped before the clip, which would turn it into a finite box (and
        # whose assertion would stop the inference).
        pred = pred[torch.isfinite(pred.pred_boxes.tensor).all(dim=1)]
        pred.pred_boxes.clip(image_size)
        # Boxes clipped to nothing are dropped before NMS (as the official post-processing does),
        # so that they take no place among the detections kept.
        pred = pred[pred.pred_boxes.nonempty()]
        if not nms:
            return pred
        keep, scores = self.class_wise_nms(pred.pred_boxes.tensor, pred.scores, pred.pred_classes)
        pred = pred[keep]
        pred.scores = scores
        return pred

    def class_wise_nms(self, boxes: Tensor, scores: Tensor, classes: Tensor) -> Tuple[Tensor, Tensor]:
        """:func:`class_wise_nms` with the model's NMS (or soft-NMS) and detections per image."""
        return class_wise_nms(
            boxes, scores, classes, self.test_nms_thresh, self.max_detections_per_image, self.test_soft_nms
        )
