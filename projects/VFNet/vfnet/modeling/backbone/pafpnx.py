"""
PAFPNX, the neck of VFNet-X (official mmdet/models/necks/pafpnx.py): FPN, a bottom-up path of
stride-2 3x3 convs, a DCNv2 3x3 conv on every level, and P6/P7 from the P5 output.
"""
from typing import Dict, List
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, DeformConv, ModulatedDeformConv, ShapeSpec, get_norm
from detectron2.modeling import BACKBONE_REGISTRY, Backbone

from ..vfnet_head import ModulatedDeformConvBlock
from ...layers.batch_norm import freeze_batchnorm_statistics
from .resnet_fpn import AnyDeviceDeformConv, AnyDeviceModulatedDeformConv


def _conv3x3(channels: int, norm: str, stride: int = 1) -> Conv2d:
    """3x3 conv -> norm, without bias when normalised (mmcv's ConvModule, bias "auto")."""
    return Conv2d(
        channels, channels, 3, stride=stride, padding=1, bias=not norm,
        norm=get_norm(norm, channels),
    )


class PAFPNX(Backbone):
    """
    From the bottom-up features C3-C5 (highest resolution first), with no activation but the
    ReLU before P7:

    * laterals L_i = conv1x1(C_i) (bias, no norm), top-down L_i += nearest-upsampled L_{i+1};
    * F_i = norm(conv3x3(L_i)); bottom-up F_{i+1} += norm(conv3x3/s2(F_i)), in increasing i;
    * P_i = norm(DCNv2 3x3(F_i)); P6 = norm(conv3x3/s2(P5)); P7 = norm(conv3x3/s2(ReLU(P6))).
    """

    @configurable
    def __init__(self, *, bottom_up: Backbone, in_features: List[str], out_channels: int,
                 norm: str = "GN", deform_conv_impl: str = "auto"):
        """
        Args:
            bottom_up: backbone whose outputs `in_features` (increasing stride, each twice the
                previous) feed the neck.
            out_channels: channels of every output.
            norm: norm of every conv but the laterals ("GN": 32 groups).
            deform_conv_impl: kernel of the DCNv2 convs (vfnet.layers.DeformConv2d's `impl`).
        """
        super().__init__()
        shapes = bottom_up.output_shape()
        strides = [shapes[f].stride for f in in_features]
        for a, b in zip(strides, strides[1:]):
            if b != 2 * a:
                raise ValueError(f"MODEL.PAFPNX.IN_FEATURES {in_features}: strides {strides} do not double.")
        self.bottom_up = bottom_up
        self.in_features = list(in_features)
        self.lateral_convs = nn.ModuleList(
            Conv2d(shapes[f].channels, out_channels, 1) for f in in_features
        )
        self.fpn_convs = nn.ModuleList(_conv3x3(out_channels, norm) for _ in in_features)
        self.downsample_convs = nn.ModuleList(
            _conv3x3(out_channels, norm, stride=2) for _ in in_features[1:]
        )
        self.pafpn_convs = nn.ModuleList(
            ModulatedDeformConvBlock(out_channels, norm, deform_conv_impl, relu=False)
            for _ in in_features
        )
        self.p6 = _conv3x3(out_channels, norm, stride=2)
        self.p7 = _conv3x3(out_channels, norm, stride=2)
        first = int(round(strides[0])).bit_length() - 1
        self._out_features = [f"p{first + i}" for i in range(len(in_features) + 2)]
        self._out_feature_strides = {f: 2 ** (first + i) for i, f in enumerate(self._out_features)}
        self._out_feature_channels = {f: out_channels for f in self._out_features}
        self._size_divisibility = strides[-1] * 4
        offset_convs = [block.conv_offset for block in self.pafpn_convs]
        convs = [*self.lateral_convs, *self.fpn_convs, *self.downsample_convs, self.p6, self.p7]
        for conv in convs + offset_convs:
            # The official neck's init (mmdet 2.10 FPN.init_weights): xavier-uniform and zero bias
            # for every nn.Conv2d of the neck, the offset convs of its DCNv2 (mmcv's
            # ModulatedDeformConv2dPack.conv_offset) included; the DCNv2 weights keep mmcv's init.
            nn.init.xavier_uniform_(conv.weight)
            if conv.bias is not None:
                nn.init.zeros_(conv.bias)

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        bottom_up = BACKBONE_REGISTRY.get(cfg.MODEL.PAFPNX.BOTTOM_UP)(cfg, input_shape)
        return {
            "bottom_up": bottom_up,
            "in_features": cfg.MODEL.PAFPNX.IN_FEATURES,
            "out_channels": cfg.MODEL.PAFPNX.OUT_CHANNELS,
            "norm": cfg.MODEL.PAFPNX.NORM,
            "deform_conv_impl": cfg.MODEL.VFNET.DEFORM_CONV_IMPL,
        }

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        """
        Args:
            x: (N, C, H, W) images.
        Returns:
            {"p3": (N, out_channels, H / 8, W / 8), ..., "p7"}.
        """
        features = self.bottom_up(x)
        laterals = [conv(features[f]) for conv, f in zip(self.lateral_convs, self.in_features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(
                laterals[i], size=laterals[i - 1].shape[-2:], mode="nearest"
            )
        inter = [conv(lateral) for conv, lateral in zip(self.fpn_convs, laterals)]
        for i, conv in enumerate(self.downsample_convs):
            inter[i + 1] = inter[i + 1] + conv(inter[i])
        outs = [conv(f) for conv, f in zip(self.pafpn_convs, inter)]
        outs.append(self.p6(outs[-1]))
        outs.append(self.p7(F.relu(outs[-1])))
        return dict(zip(self._out_features, outs))


@BACKBONE_REGISTRY.register()
def build_vfnet_pafpnx_backbone(cfg, input_shape: ShapeSpec):
    """
    PAFPNX (VFNet-X's neck) over the bottom-up backbone MODEL.PAFPNX.BOTTOM_UP (any
    BACKBONE_REGISTRY builder); the deformable convs of its DCN stages run on CPU too.

    Returns:
        Backbone with outputs p3-p7 of MODEL.PAFPNX.OUT_CHANNELS channels.
    """
    neck = PAFPNX(cfg, input_shape)
    for module in neck.bottom_up.modules():
        # As build_vfnet_resnet_fpn_backbone: same parameters, a forward that runs on CPU.
        if type(module) is ModulatedDeformConv:
            module.__class__ = AnyDeviceModulatedDeformConv
        elif type(module) is DeformConv:
            module.__class__ = AnyDeviceDeformConv
    if cfg.MODEL.BACKBONE.NORM_EVAL:  # (build_res2net_backbone has done it already; idempotent)
        freeze_batchnorm_statistics(neck.bottom_up)
    return neck
