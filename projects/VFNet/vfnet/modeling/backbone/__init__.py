"""Backbones registered with Detectron2's BACKBONE_REGISTRY."""
from .res2net import build_res2net_backbone, build_vfnet_res2net_fpn_backbone
from .resnet_fpn import (
    AnyDeviceDeformConv,
    AnyDeviceModulatedDeformConv,
    build_vfnet_resnet_fpn_backbone,
)
from .retinanet_fpn import LastLevelP6P7WithoutReLU, build_mmdet_retinanet_resnet_fpn_backbone
from .pafpnx import PAFPNX, build_vfnet_pafpnx_backbone
