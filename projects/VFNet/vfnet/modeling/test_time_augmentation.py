"""
Test-time augmentation of VarifocalNet, as the official code does it (VarifocalNet's
configs/vfnet/vfnet_r50_fpn_1x_coco_tta.py and VFNet.aug_test, MMDetection's
BBoxTestMixin.aug_test_bboxes for dense heads): the image is resized to several scales, each
with and without a horizontal flip; the detections of every view before NMS are mapped back to
the original image and concatenated, then one class-wise NMS and the top
TEST_DETECTIONS_PER_IMAGE give the detections. Turned on by TEST.AUG.ENABLED
(`vfnet.engine.Trainer.test_with_TTA`), as Detectron2's GeneralizedRCNNWithTTA is for R-CNN.
"""
import copy
from typing import Dict, List, Sequence
import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.data.transforms import ResizeTransform, TransformList
from detectron2.layers import cat
from detectron2.modeling import DatasetMapperTTA
from detectron2.structures import Boxes, Instances

from ..data.mapper import read_image
from ..data.transforms import RESIZE_BACKENDS, CV2ResizeTransform

__all__ = ["VFNetDatasetMapperTTA", "VFNetWithTTA", "tta_scales"]


def tta_scales(cfg):
    """
    The (short side, long-side limit) of each test scale: TEST.AUG.MIN_SIZES, each with its
    TEST.AUG.MAX_SIZES entry, or with TEST.AUG.MAX_SIZE when MAX_SIZES is empty.
    MMDetection's keep-ratio scale (long, short), e.g. (1333, 800), is (short, long) here.
    """
    min_sizes = list(cfg.TEST.AUG.MIN_SIZES)
    max_sizes = list(cfg.TEST.AUG.get("MAX_SIZES", ()))
    if not min_sizes:
        raise ValueError("TEST.AUG.MIN_SIZES is empty: test-time augmentation needs a scale.")
    if not max_sizes:
        max_sizes = [cfg.TEST.AUG.MAX_SIZE] * len(min_sizes)
    if len(max_sizes) != len(min_sizes):
        raise ValueError(
            f"TEST.AUG.MAX_SIZES {tuple(max_sizes)} must have one entry per TEST.AUG.MIN_SIZES "
            f"{tuple(min_sizes)} (or be empty: TEST.AUG.MAX_SIZE for all)."
        )
    return list(zip(min_sizes, max_sizes))


class VFNetDatasetMapperTTA:
    """
    Detectron2's :class:`DatasetMapperTTA`, one per test scale (short side and its own
    long-side limit), the images resized with INPUT.RESIZE_BACKEND ("cv2": OpenCV, as
    MMDetection resizes, for its weights).

    Called on a dataset dict with "image" (CHW uint8, in the model's input format) and the
    original "height" and "width", it returns one dict per view, in the order of the scales,
    each unflipped then (with `flip`) flipped; each has "transforms", the TransformList from the
    original image to the view (its inverse maps boxes back).
    """

    def __init__(self, scales: Sequence, flip: bool = True, resize_backend: str = "PIL"):
        """
        Args:
            scales: (short side, long-side limit) of each test scale (see :func:`tta_scales`).
            flip: add the horizontally flipped image of each scale.
            resize_backend: "PIL" (Detectron2's) or "cv2".
        """
        if resize_backend not in RESIZE_BACKENDS:
            raise ValueError(
                f"INPUT.RESIZE_BACKEND must be one of {RESIZE_BACKENDS}, got '{resize_backend}'."
            )
        self.scales = [(int(s), int(m)) for s, m in scales]
        self.flip = flip
        self.resize_backend = resize_backend
        self.mappers = [DatasetMapperTTA(min_sizes=[s], max_size=m, flip=flip) for s, m in scales]

    @classmethod
    def from_config(cls, cfg):
        return cls(tta_scales(cfg), cfg.TEST.AUG.FLIP, cfg.INPUT.get("RESIZE_BACKEND", "PIL"))

    def __len__(self):
        return len(self.scales) * (2 if self.flip else 1)

    def __call__(self, dataset_dict: Dict) -> List[Dict]:
        views = [view for mapper in self.mappers for view in mapper(dataset_dict)]
        if self.resize_backend == "cv2":
            image = dataset_dict["image"].permute(1, 2, 0).numpy()
            for view in views:
                # DatasetMapperTTA's transforms: the one from the original image to the given
                # image (a no-op when it is the original), then those applied to it.
                steps = [
                    CV2ResizeTransform(t.h, t.w, t.new_h, t.new_w, t.interp)
                    if type(t) is ResizeTransform
                    else t
                    for t in view["transforms"].transforms[1:]
                ]
                pixels = TransformList(steps).apply_image(np.copy(image))
                view["image"] = torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))
        return views


class VFNetWithTTA(nn.Module):
    """
    A :class:`VFNet` with test-time augmentation; called as the model is in inference, on
    ``[{"image": CHW tensor, "height": H, "width": W}, ...]`` (or ``{"file_name": ...}``), it
    returns ``[{"instances": Instances}, ...]`` in the coordinates of the original image
    (height x width). Give it the original image (not resized): each view is resized from it.

    For each image: the views of :class:`VFNetDatasetMapperTTA` (TEST.AUG.MIN_SIZES with
    TEST.AUG.MAX_SIZES or MAX_SIZE, flipped with TEST.AUG.FLIP); per view, the model's
    detections before NMS (:meth:`VFNet.inference_candidates`: scores above
    TEST_SCORE_THRESH, at most TEST_TOPK_CANDIDATES per level, boxes clipped to the view); the
    boxes mapped back to the original image by the inverse of the view's transforms (flip
    x -> w - x, then the resize's scale factors); all views concatenated, clipped to the
    image, then the class-wise NMS (TEST_NMS_THRESH) and the top TEST_DETECTIONS_PER_IMAGE.
    This is VFNet.aug_test / MMDetection's aug_test_bboxes (boxes and scores of all views
    concatenated, then multiclass_nms), not the averaging of merge_aug_bboxes used for R-CNN.

    Example (DefaultPredictor-style; the model in eval mode, on the original image)::

        predictor = DefaultPredictor(cfg)
        tta = VFNetWithTTA(cfg, predictor.model)
        image = read_image(path, format=cfg.INPUT.FORMAT)  # HWC, original size
        with torch.no_grad():
            out = tta([{"image": torch.as_tensor(image.transpose(2, 0, 1).copy())}])[0]
    """

    def __init__(self, cfg, model, tta_mapper=None, batch_size: int = 1):
        """
        Args:
            cfg: the model's config (TEST.AUG.*, INPUT.FORMAT, INPUT.RESIZE_BACKEND).
            model: a :class:`VFNet` (or DistributedDataParallel of one).
            tta_mapper: a callable from a dataset dict to its augmented views (dicts with
                "transforms"); default :class:`VFNetDatasetMapperTTA` of `cfg`.
            batch_size: views run through the model together. 1 (default): each view alone,
                padded as in plain inference, as the official code runs them; larger batches
                pad the views to the largest and may change the detections slightly.
        """
        super().__init__()
        if isinstance(model, DistributedDataParallel):
            model = model.module
        if not hasattr(model, "inference_candidates"):
            raise TypeError(
                f"VFNetWithTTA needs a VFNet (a model with inference_candidates), got "
                f"{type(model).__name__}."
            )
        self.cfg = cfg.clone()
        self.model = model
        if tta_mapper is None:
            tta_mapper = VFNetDatasetMapperTTA.from_config(cfg)
        self.tta_mapper = tta_mapper
        self.batch_size = batch_size
        self.input_format = cfg.INPUT.FORMAT

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        return [self._inference_one_image(self._with_image(x)) for x in batched_inputs]

    def _with_image(self, dataset_dict: Dict) -> Dict:
        ret = copy.copy(dataset_dict)
        if "image" not in ret:
            image = read_image(ret["file_name"], format=self.input_format)
            ret["image"] = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))
        ret.setdefault("height", int(ret["image"].shape[1]))
        ret.setdefault("width", int(ret["image"].shape[2]))
        return ret

    @torch.no_grad()
    def _inference_one_image(self, dataset_dict: Dict) -> Dict[str, Instances]:
        views = self.tta_mapper(dataset_dict)
        tfms = [view.pop("transforms") for view in views]
        candidates = []
        for start in range(0, len(views), self.batch_size):
            batch = views[start : start + self.batch_size]
            candidates.extend(self.model.inference_candidates(batch))
        shape = (int(dataset_dict["height"]), int(dataset_dict["width"]))
        return {"instances": self.merge(candidates, tfms, shape)}

    def merge(
        self, candidates: List[Instances], tfms: List[TransformList], image_size
    ) -> Instances:
        """
        The detections of the views: `candidates` (per view, before NMS, in the view's
        coordinates) mapped back by the inverse of `tfms`, concatenated, clipped to
        `image_size` (height, width) and empty boxes dropped, then the class-wise NMS and the
        top detections of the model.
        """
        boxes = []
        for inst, tfm in zip(candidates, tfms):
            view_boxes = inst.pred_boxes.tensor
            back = tfm.inverse().apply_box(view_boxes.detach().cpu().float().numpy())
            boxes.append(torch.from_numpy(np.asarray(back, dtype=np.float32)).to(view_boxes))
        boxes = Boxes(cat(boxes, dim=0))
        scores = cat([x.scores for x in candidates], dim=0)
        classes = cat([x.pred_classes for x in candidates], dim=0)
        boxes.clip(image_size)
        keep = boxes.nonempty()
        boxes, scores, classes = boxes[keep], scores[keep], classes[keep]
        keep, kept_scores = self.model.class_wise_nms(boxes.tensor, scores, classes)
        return Instances(
            image_size, pred_boxes=boxes[keep], scores=kept_scores, pred_classes=classes[keep]
        )
