"""
Res2Net v1d (Gao et al., TPAMI 2021; the "v1d" ResNet tricks of Bag of Tricks, He et al. 2019)
as a Detectron2 backbone: the deep stem, the Bottle2neck blocks with their hierarchical 3x3
convs over `scales` channel splits, and the average-pool shortcut. It computes what
MMDetection's ``Res2Net`` (mmdet/models/backbones/res2net.py, style "pytorch") computes, with
the names of Detectron2's ResNet (see vfnet/checkpoint/converter.py for the mapping).
"""

import math

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.layers import CNNBlockBase, Conv2d, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import ResNet

from ...layers.batch_norm import freeze_batchnorm_statistics
from .resnet_fpn import AnyDeviceDeformConv, AnyDeviceModulatedDeformConv, vfnet_fpn

__all__ = [
    "Bottle2neckBlock",
    "Res2NetStem",
    "build_res2net_backbone",
    "build_vfnet_res2net_fpn_backbone",
    "res2net_width",
]

# Blocks per stage res2-res5, by depth.
RES2NET_BLOCKS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}


def res2net_width(stage: int, base_width: int) -> int:
    """Channels of one split in stage `stage` (0 for res2): floor(64 * 2**stage * base_width / 64)."""
    return int(math.floor(64 * 2**stage * (base_width / 64)))


class Res2NetStem(CNNBlockBase):
    """
    The deep stem: three 3x3 convs (stride 2, 1, 1; out_channels // 2, out_channels // 2,
    out_channels), each with norm and ReLU, then a 3x3 max pool of stride 2. Stride 4.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 64, norm="BN"):
        super().__init__(in_channels, out_channels, 4)
        mid = out_channels // 2
        self.conv1 = Conv2d(
            in_channels, mid, 3, stride=2, padding=1, bias=False, norm=get_norm(norm, mid)
        )
        self.conv2 = Conv2d(mid, mid, 3, stride=1, padding=1, bias=False, norm=get_norm(norm, mid))
        self.conv3 = Conv2d(
            mid, out_channels, 3, stride=1, padding=1, bias=False, norm=get_norm(norm, out_channels)
        )
        for layer in (self.conv1, self.conv2, self.conv3):
            weight_init.c2_msra_fill(layer)

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, out_channels, ceil(H / 4), ceil(W / 4))."""
        for conv in (self.conv1, self.conv2, self.conv3):
            x = F.relu_(conv(x))
        return F.max_pool2d(x, kernel_size=3, stride=2, padding=1)


class Bottle2neckBlock(CNNBlockBase):
    """
    The Res2Net bottleneck: a 1x1 conv to `scales` splits of `width` channels; split j < scales - 1
    goes through its own 3x3 conv (``conv2[j]``, with norm and ReLU), fed with split j plus the
    output of conv j - 1 (split j alone in the first block of a stage, `first_in_stage`); the last
    split passes unchanged (in the first block of a stage with stride > 1: through a 3x3 average
    pool of that stride, zero padding counted); the concatenation goes through a 1x1 conv, and is
    added to the shortcut: identity, or (v1d) an average pool of the stride (ceil mode, padding not
    counted) and a 1x1 conv with norm; then ReLU. The stride is in the 3x3 convs. With `deform`,
    the 3x3 convs are deformable (DCNv1, or DCNv2 with `deform_modulated`), each with its offset
    conv ``conv2_offset[j]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        width: int,
        scales: int = 4,
        stride: int = 1,
        first_in_stage: bool = False,
        norm="BN",
        deform: bool = False,
        deform_modulated: bool = False,
        deform_num_groups: int = 1,
    ):
        super().__init__(in_channels, out_channels, stride)
        if scales < 2:
            raise ValueError(
                f"Res2Net needs MODEL.RES2NET.SCALES >= 2, got {scales} (1 is a ResNet)."
            )
        self.width, self.scales, self.first_in_stage = width, scales, first_in_stage
        self.deform, self.deform_modulated = deform, deform_modulated
        if in_channels != out_channels or stride != 1:
            self.shortcut = Conv2d(
                in_channels, out_channels, 1, bias=False, norm=get_norm(norm, out_channels)
            )
        else:
            self.shortcut = None
        self.conv1 = Conv2d(
            in_channels, width * scales, 1, bias=False, norm=get_norm(norm, width * scales)
        )
        if deform:
            conv_op = AnyDeviceModulatedDeformConv if deform_modulated else AnyDeviceDeformConv
            offset_channels = (27 if deform_modulated else 18) * deform_num_groups
            self.conv2_offset = nn.ModuleList(
                Conv2d(width, offset_channels, 3, stride=stride, padding=1)
                for _ in range(scales - 1)
            )
            self.conv2 = nn.ModuleList(
                conv_op(
                    width, width, 3, stride=stride, padding=1, bias=False,
                    deformable_groups=deform_num_groups, norm=get_norm(norm, width),
                )
                for _ in range(scales - 1)
            )  # fmt: skip
        else:
            self.conv2 = nn.ModuleList(
                Conv2d(
                    width,
                    width,
                    3,
                    stride=stride,
                    padding=1,
                    bias=False,
                    norm=get_norm(norm, width),
                )
                for _ in range(scales - 1)
            )
        self.conv3 = Conv2d(
            width * scales, out_channels, 1, bias=False, norm=get_norm(norm, out_channels)
        )
        for layer in [self.conv1, *self.conv2, self.conv3, self.shortcut]:
            if layer is not None:
                weight_init.c2_msra_fill(layer)
        if deform:
            for layer in self.conv2_offset:
                nn.init.constant_(layer.weight, 0)
                nn.init.constant_(layer.bias, 0)

    def _conv2(self, j: int, x: Tensor) -> Tensor:
        """3x3 conv j (deformable: offsets, and DCNv2's sigmoid mask, from conv2_offset[j]) and ReLU."""
        if not self.deform:
            return F.relu_(self.conv2[j](x))
        offset = self.conv2_offset[j](x)
        if self.deform_modulated:
            offset_x, offset_y, mask = torch.chunk(offset, 3, dim=1)
            out = self.conv2[j](x, torch.cat((offset_x, offset_y), dim=1), mask.sigmoid())
        else:
            out = self.conv2[j](x, offset)
        return F.relu_(out)

    def forward(self, x: Tensor) -> Tensor:
        """(N, in_channels, H, W) -> (N, out_channels, ceil(H / stride), ceil(W / stride))."""
        splits = torch.split(F.relu_(self.conv1(x)), self.width, dim=1)
        outs = []
        for j in range(self.scales - 1):
            sp = splits[j] if j == 0 or self.first_in_stage else outs[-1] + splits[j]
            outs.append(self._conv2(j, sp.contiguous()))
        last = splits[-1]
        if self.first_in_stage and self.stride != 1:
            last = F.avg_pool2d(last, kernel_size=3, stride=self.stride, padding=1)
        out = self.conv3(torch.cat(outs + [last], dim=1))
        if self.shortcut is None:
            shortcut = x
        else:
            if self.stride != 1:
                x = F.avg_pool2d(
                    x, self.stride, self.stride, ceil_mode=True, count_include_pad=False
                )
            shortcut = self.shortcut(x)
        return F.relu_(out + shortcut)


@BACKBONE_REGISTRY.register()
def build_res2net_backbone(cfg, input_shape: ShapeSpec):
    """
    Res2Net v1d of MODEL.RESNETS.DEPTH (50, 101 or 152) with MODEL.RES2NET.SCALES splits of
    MODEL.RES2NET.BASE_WIDTH channels (x 2 per stage), deep stem 32-32-64, norm
    MODEL.RESNETS.NORM, deformable 3x3 convs in the stages of MODEL.RESNETS.DEFORM_ON_PER_STAGE
    (MODEL.RESNETS.DEFORM_MODULATED, DEFORM_NUM_GROUPS), frozen up to MODEL.BACKBONE.FREEZE_AT.

    Returns:
        Detectron2's ResNet (a Backbone) with outputs MODEL.RESNETS.OUT_FEATURES of res2-res5
        (strides 4-32, channels 256-2048).
    """
    r = cfg.MODEL.RESNETS
    if r.DEPTH not in RES2NET_BLOCKS:
        raise ValueError(
            f"MODEL.RESNETS.DEPTH {r.DEPTH} has no Res2Net: use one of {sorted(RES2NET_BLOCKS)}."
        )
    if len(r.DEFORM_ON_PER_STAGE) != 4:
        raise ValueError(
            f"MODEL.RESNETS.DEFORM_ON_PER_STAGE needs 4 entries (res2-res5), got {r.DEFORM_ON_PER_STAGE}."
        )
    scales, base_width = cfg.MODEL.RES2NET.SCALES, cfg.MODEL.RES2NET.BASE_WIDTH
    stem = Res2NetStem(input_shape.channels, 64, norm=r.NORM)
    stages, in_channels = [], 64
    for i, num_blocks in enumerate(RES2NET_BLOCKS[r.DEPTH]):
        out_channels = 256 * 2**i
        stages.append(
            ResNet.make_stage(
                Bottle2neckBlock,
                num_blocks,
                in_channels=in_channels,
                out_channels=out_channels,
                width=res2net_width(i, base_width),
                scales=scales,
                stride_per_block=[1 if i == 0 else 2] + [1] * (num_blocks - 1),
                first_in_stage_per_block=[True] + [False] * (num_blocks - 1),
                norm=r.NORM,
                deform=bool(r.DEFORM_ON_PER_STAGE[i]),
                deform_modulated=r.DEFORM_MODULATED,
                deform_num_groups=r.DEFORM_NUM_GROUPS,
            )
        )
        in_channels = out_channels
    backbone = ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)
    if cfg.MODEL.BACKBONE.NORM_EVAL:
        freeze_batchnorm_statistics(backbone)
    return backbone


@BACKBONE_REGISTRY.register()
def build_vfnet_res2net_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Res2Net (:func:`build_res2net_backbone`) + the FPN P3-P7 of
    :func:`build_vfnet_resnet_fpn_backbone` (P6 from the P5 output).

    Returns:
        Backbone with outputs p3-p7 (strides 8-128) of MODEL.FPN.OUT_CHANNELS channels.
    """
    return vfnet_fpn(cfg, build_res2net_backbone(cfg, input_shape))
