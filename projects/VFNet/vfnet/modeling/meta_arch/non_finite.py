"""
Where a non-finite value first appears in a training step of a dense detector, in the order of
the computation: what the trainer reports once a loss is not finite (vfnet/engine/train_loop.py).
"""
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from detectron2.structures import ImageList, Instances

__all__ = ["first_non_finite"]


def first_non_finite(
    model: nn.Module,
    images: ImageList,
    features: List[Tensor],
    predictions: List[List[Tensor]],
    gt_instances: List[Instances],
    feature_names: List[str],
) -> Tuple[str, Optional[int]]:
    """
    Where a non-finite value first appears in a training step, in the order of the computation:
    the input images, their boxes, the model's parameters, the features, the head's outputs.

    Returns:
        (a description, the index of the image in the batch or None).
    """
    for i, (size, inst) in enumerate(zip(images.image_sizes, gt_instances)):
        if not torch.isfinite(images.tensor[i, :, : size[0], : size[1]]).all():
            return "the pixels of the input image (after normalisation)", i
        if not torch.isfinite(inst.gt_boxes.tensor).all():
            return "a ground-truth box", i
    for name, param in model.named_parameters():
        if not torch.isfinite(param).all():
            return f"the parameter {name} (an earlier step diverged)", None
    for level, feature in zip(feature_names, features):
        for i in range(len(feature)):
            if not torch.isfinite(feature[i]).all():
                return f"the backbone's feature {level}, from finite inputs and weights", i
    for kind, per_level in zip(("logits", "boxes_init", "boxes_refine"), predictions):
        for level, x in zip(feature_names, per_level):
            for i in range(len(x)):
                if not torch.isfinite(x[i]).all():
                    return f"the head's {kind} at {level}, from finite features", i
    return "the losses, from finite inputs, features and predictions (an overflow)", None
