"""Backbones registered with Detectron2's BACKBONE_REGISTRY."""
from .resnet_fpn import (
    AnyDeviceDeformConv,
    AnyDeviceModulatedDeformConv,
    build_vfnet_resnet_fpn_backbone,
)
from .pafpnx import PAFPNX, build_vfnet_pafpnx_backbone
