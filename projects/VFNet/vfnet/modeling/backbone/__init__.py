"""Backbones registered with Detectron2's BACKBONE_REGISTRY."""
from .resnet_fpn import (
    AnyDeviceDeformConv,
    AnyDeviceModulatedDeformConv,
    build_vfnet_resnet_fpn_backbone,
)
from .retinanet_fpn import LastLevelP6P7WithoutReLU, build_mmdet_retinanet_resnet_fpn_backbone
