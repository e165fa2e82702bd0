"""
VarifocalNet for Detectron2.

``import vfnet`` registers the meta-architectures "VFNet" and "IoUAwareRetinaNet" (Detectron2's
RetinaNet with the varifocal or quality focal loss), the backbones
"build_vfnet_resnet_fpn_backbone", "build_res2net_backbone", "build_vfnet_res2net_fpn_backbone"
and "build_mmdet_retinanet_resnet_fpn_backbone", the project's datasets and the ``vfnet://`` addresses
of the official weights (``MODEL.WEIGHTS vfnet://VFNet_R_50_FPN_1x``) with Detectron2. The pure
algorithms (ATSS, losses, box coding, star offsets, the deformable-conv kernels, the dataset
generator) import without Detectron2. The layout follows Detectron2's: see docs/ARCHITECTURE.md.
"""
from .modeling.atss import ATSSMatcher
from .modeling.box_coding import aligned_iou, boxes_to_distances, distances_to_boxes
from .modeling.losses import iou_weighted_giou_loss, quality_focal_loss, varifocal_loss
from .modeling.star_dcn import star_dcn_offsets

try:
    import detectron2  # noqa: F401
except ModuleNotFoundError:
    HAS_DETECTRON2 = False
else:
    HAS_DETECTRON2 = True
    from .checkpoint.catalog import ModelCatalog  # the vfnet:// addresses of PathManager
    from .config import add_vfnet_config
    from .data.datasets import register_coco_dataset, register_shapes_datasets
    from .modeling.backbone import build_vfnet_resnet_fpn_backbone
    from .modeling.meta_arch import IoUAwareFCOS, IoUAwareRetinaNet, VFNet
    from .modeling.vfnet_head import VFNetHead

    register_shapes_datasets()
