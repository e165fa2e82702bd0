"""
VarifocalNet for Detectron2.

``import vfnet`` registers the meta-architecture "VFNet" and the backbone
"build_vfnet_resnet_fpn_backbone" with Detectron2, and the project's datasets. The pure
algorithms (losses, ATSS, box coding, star offsets, the dataset generator) import without
Detectron2.
"""
from .atss import ATSSMatcher
from .box_coding import aligned_iou, boxes_to_distances, distances_to_boxes
from .losses import iou_weighted_giou_loss, varifocal_loss
from .star_dcn import star_dcn_offsets

try:
    import detectron2  # noqa: F401
except ModuleNotFoundError:
    HAS_DETECTRON2 = False
else:
    HAS_DETECTRON2 = True
    from .backbone import build_vfnet_resnet_fpn_backbone
    from .config import add_vfnet_config
    from .data.datasets import register_coco_dataset, register_shapes_datasets
    from .head import VFNetHead
    from .meta_arch import VFNet

    register_shapes_datasets()
