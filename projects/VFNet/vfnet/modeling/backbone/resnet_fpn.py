"""
The backbone of VFNet: Detectron2's ResNet and FPN with P6/P7 from the P5 output, and the
deformable convs of its DCN stages swapped for ones that also run (and train) on CPU.
"""
import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

from detectron2.layers import DeformConv, ModulatedDeformConv, ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, Backbone, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7

from ...layers.batch_norm import freeze_batchnorm_statistics
from ...layers.deform_conv import detectron2_kernel_inputs, finite_offsets


def runs_detectron2_kernel(x: Tensor) -> bool:
    """Whether the DCN stages run Detectron2's CUDA kernel on `x` (else torchvision's)."""
    return x.is_cuda


class _AnyDeviceDeformConv:
    """
    Mixin for Detectron2's (Modulated)DeformConv: its CUDA kernel on GPU, torchvision's
    `deform_conv2d` with the same parameters on CPU, where Detectron2's has no backward (and no
    modulated forward).
    """

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor = None) -> Tensor:
        # A non-finite offset reads zero (vfnet.layers.finite_offsets), and never reaches the
        # kernels: torchvision's CPU kernel crashes the process on NaN.
        offset = finite_offsets(offset)
        if runs_detectron2_kernel(x):
            # In the weight's dtype (under autocast too) and NCHW-contiguous, as the kernel
            # reads them; Detectron2's forward then adds norm and activation.
            x, offset, mask = detectron2_kernel_inputs(self.weight, x, offset, mask)
            return super().forward(x, offset) if mask is None else super().forward(x, offset, mask)
        # One dtype for all inputs (float32 under autocast: sampling positions included).
        dtype = torch.promote_types(x.dtype, self.weight.dtype)
        x = deform_conv2d(
            x.to(dtype), offset.to(dtype), self.weight.to(dtype),
            None if self.bias is None else self.bias.to(dtype), self.stride, self.padding,
            self.dilation, None if mask is None else mask.to(dtype),
        )
        if self.norm is not None:
            x = self.norm(x)
        if self.activation is not None:
            x = self.activation(x)
        return x


class AnyDeviceDeformConv(_AnyDeviceDeformConv, DeformConv):
    pass


class AnyDeviceModulatedDeformConv(_AnyDeviceDeformConv, ModulatedDeformConv):
    pass


@BACKBONE_REGISTRY.register()
def build_vfnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet + FPN on res3-res5 with P6 = conv3x3/s2(P5) and P7 = conv3x3/s2(ReLU(P6)), as the
    official VarifocalNet (P6 from the P5 *output*, unlike RetinaNet's P6 from C5). The
    deformable convs of the DCN variants (MODEL.RESNETS.DEFORM_ON_PER_STAGE) run on CPU too. With
    MODEL.BACKBONE.NORM_EVAL, the BatchNorm layers of the ResNet (MODEL.RESNETS.NORM "BN" or
    "SyncBN") keep their running statistics and train their affine (MMDetection's norm_eval);
    the stages frozen by MODEL.BACKBONE.FREEZE_AT are FrozenBN as always.

    Returns:
        Backbone with outputs p3-p7 (strides 8-128) of MODEL.FPN.OUT_CHANNELS channels.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    for module in bottom_up.modules():
        # Same parameters and state, another forward: the class is swapped in place.
        if type(module) is ModulatedDeformConv:
            module.__class__ = AnyDeviceModulatedDeformConv
        elif type(module) is DeformConv:
            module.__class__ = AnyDeviceDeformConv
    if cfg.MODEL.BACKBONE.NORM_EVAL:
        freeze_batchnorm_statistics(bottom_up)
    return vfnet_fpn(cfg, bottom_up)


def vfnet_fpn(cfg, bottom_up: Backbone) -> FPN:
    """
    VFNet's FPN over `bottom_up` (any backbone with MODEL.FPN.IN_FEATURES among its outputs):
    MODEL.FPN.OUT_CHANNELS channels, P6 = conv3x3/s2(P5), P7 = conv3x3/s2(ReLU(P6)).
    """
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    fpn = FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
    return xavier_init_fpn(fpn)


def xavier_init_fpn(fpn: FPN) -> FPN:
    """
    The official neck's init (mmdet 2.10 FPN.init_weights) for `fpn`, in place: every conv of
    the FPN (not of its bottom-up) xavier-uniform, zero bias, where Detectron2's FPN has
    c2_xavier_fill (the same bound for the 3x3 convs, another for the 1x1 laterals, whose
    fan-in and fan-out differ). Returns `fpn` (for LazyConfig: ``L(xavier_init_fpn)(fpn=...)``).
    """
    for name, module in fpn.named_modules():
        if isinstance(module, nn.Conv2d) and not name.startswith("bottom_up."):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return fpn
