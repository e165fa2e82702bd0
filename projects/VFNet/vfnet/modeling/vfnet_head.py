"""
The VarifocalNet head: classification and regression towers, the initial box, the star-shaped
deformable convolutions, box refinement and the IoU-aware classification score.
"""
import math
from typing import List, Tuple
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm

from ..layers.deform_conv import DeformConv2d
from .star_dcn import star_dcn_offsets


def feature_memory_format(device: torch.device) -> torch.memory_format:
    """The memory format VFNet computes in on `device`: its input images (VFNet's
    preprocess_image) and the head's features (VFNetHead.memory_format None)."""
    # CPU: channels-last (oneDNN's convolutions skip a layout reorder, 1.2-1.35x on R-50's
    # backbone in fp32 and 3-4x under bf16 autocast; the gather kernel reads contiguous channel
    # vectors; docs/BENCHMARKS.md). CUDA: NCHW, which Detectron2's deformable kernels read;
    # channels-last is unmeasured there (tools/gpu_check.py measures it for the head).
    return torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format


class ModulatedDeformConvBlock(nn.Module):
    """
    DCNv2 3x3 conv -> norm -> ReLU (none if not `relu`), with offsets and modulation predicted
    from its input by a zero-initialised 3x3 conv (so that it starts as a plain convolution).
    Initialised as mmcv's ModulatedDeformConv2dPack: weight uniform in +-1/sqrt(9 x channels),
    zero bias (the official head keeps this init for its last tower conv).
    """

    def __init__(self, channels: int, norm: str, impl: str, relu: bool = True):
        super().__init__()
        self.relu = relu
        self.conv_offset = nn.Conv2d(channels, 27, 3, padding=1)
        self.conv = DeformConv2d(channels, channels, 3, padding=1, bias=not norm, impl=impl)
        self.norm = get_norm(norm, channels)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)
        bound = 1 / math.sqrt(channels * 9)
        nn.init.uniform_(self.conv.weight, -bound, bound)
        if self.conv.bias is not None:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        offset_y_x_mask = self.conv_offset(x)
        offset_1, offset_2, mask = offset_y_x_mask.chunk(3, dim=1)
        x = self.conv(x, torch.cat([offset_1, offset_2], dim=1), mask.sigmoid())
        if self.norm is not None:
            x = self.norm(x)
        return F.relu(x) if self.relu else x


class VFNetHead(nn.Module):
    """
    Per FPN level (weights shared across levels), predicts:

    * the initial box: distances (l, t, r, b) from each location, exp(scale_i * conv) times the
      level's normaliser;
    * the refined box: a deformable conv sampling the star of the initial box, then per-location
      factors exp(scale_refine_i * conv) applied to the (detached) initial box;
    * the IoU-aware classification score, from a deformable conv over the same star.
    """

    @configurable
    def __init__(
        self,
        *,
        input_shape: List[ShapeSpec],
        num_classes: int,
        num_convs: int = 3,
        norm: str = "GN",
        bbox_norm_type: str = "reg_denom",
        gradient_mul: float = 0.1,
        dcn_on_last_conv: bool = False,
        use_star_dcn: bool = True,
        use_refine: bool = True,
        prior_prob: float = 0.01,
        deform_conv_impl: str = "auto",
    ):
        """
        Args:
            input_shape: shapes of the input features, one per level, highest resolution first.
            num_classes: number of object classes.
            num_convs: number of conv3x3 -> norm -> ReLU layers in each tower.
            norm: normalization of the towers ("GN", "BN", "" for none, ...).
            bbox_norm_type: "reg_denom" scales the initial box of a level by 8 x its stride (the
                official regression ranges 64, 128, 256, 512, 1024); "stride" by the stride.
            gradient_mul: share of the gradient from the star offsets to the initial box.
            dcn_on_last_conv: make the last conv of each tower a DCNv2 conv.
            use_star_dcn: sample the star with deformable convs; False uses plain 3x3 convs.
            use_refine: predict the refined box; False outputs the initial box.
            prior_prob: initial foreground probability of the classification score.
            deform_conv_impl: kernel of the deformable convs, see :class:`DeformConv2d`.
        """
        super().__init__()
        channels = {s.channels for s in input_shape}
        if len(channels) != 1:
            raise ValueError(f"VFNetHead needs features with one channel count, got {channels}.")
        if bbox_norm_type not in ("reg_denom", "stride"):
            raise ValueError(
                f"MODEL.VFNET.BBOX_NORM_TYPE must be 'reg_denom' or 'stride', got '{bbox_norm_type}'."
            )
        c = channels.pop()
        self.strides = [s.stride for s in input_shape]
        self.box_normalizers = [s * 8 if bbox_norm_type == "reg_denom" else s for s in self.strides]
        self.gradient_mul = gradient_mul
        self.use_star_dcn = use_star_dcn
        self.use_refine = use_refine
        # The memory format of the features; None: feature_memory_format of their device.
        self.memory_format = None

        def tower():
            layers = [
                Conv2d(c, c, 3, padding=1, bias=not norm, norm=get_norm(norm, c), activation=F.relu)
                for _ in range(num_convs)
            ]
            if dcn_on_last_conv and num_convs > 0:
                layers[-1] = ModulatedDeformConvBlock(c, norm, deform_conv_impl)
            return nn.Sequential(*layers)

        def star_conv():
            if use_star_dcn:
                return DeformConv2d(c, c, 3, padding=1, impl=deform_conv_impl)
            return nn.Conv2d(c, c, 3, padding=1, bias=False)

        self.cls_tower = tower()
        self.reg_tower = tower()
        self.reg_init_conv = Conv2d(
            c, c, 3, padding=1, bias=not norm, norm=get_norm(norm, c), activation=F.relu
        )
        self.reg_init = nn.Conv2d(c, 4, 3, padding=1)
        self.scales = nn.Parameter(torch.ones(len(input_shape)))
        if use_refine:
            self.reg_refine_conv = star_conv()
            self.reg_refine = nn.Conv2d(c, 4, 3, padding=1)
            self.scales_refine = nn.Parameter(torch.ones(len(input_shape)))
        self.cls_conv = star_conv()
        self.cls_score = nn.Conv2d(c, num_classes, 3, padding=1)

        # The official init (mmdet 2.10 VFNetHead.init_weights): normal(0, 0.01) and zero bias for
        # the convs, the classifier's bias at the prior; the DCNv2 tower convs keep their own.
        dcn_blocks = {m for b in self.modules() if isinstance(b, ModulatedDeformConvBlock) for m in b.modules()}
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, DeformConv2d)) and module not in dcn_blocks:
                nn.init.normal_(module.weight, std=0.01)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.constant_(self.cls_score.bias, -math.log((1 - prior_prob) / prior_prob))

    @classmethod
    def from_config(cls, cfg, input_shape: List[ShapeSpec]):
        v = cfg.MODEL.VFNET
        return {
            "input_shape": input_shape,
            "num_classes": v.NUM_CLASSES,
            "num_convs": v.NUM_CONVS,
            "norm": v.NORM,
            "bbox_norm_type": v.BBOX_NORM_TYPE,
            "gradient_mul": v.GRADIENT_MUL,
            "dcn_on_last_conv": v.DCN_ON_LAST_CONV,
            "use_star_dcn": v.USE_STAR_DCN,
            "use_refine": v.USE_REFINE,
            "prior_prob": v.PRIOR_PROB,
            "deform_conv_impl": v.DEFORM_CONV_IMPL,
        }

    def _star_conv(self, layer: nn.Module, x: Tensor, offsets: Tensor) -> Tensor:
        return F.relu(layer(x, offsets) if self.use_star_dcn else layer(x))

    def forward(self, features: List[Tensor]) -> Tuple[List[Tensor], List[Tensor], List[Tensor]]:
        """
        Args:
            features: per level, (N, C, Hi, Wi).

        Returns:
            logits: per level, (N, K, Hi, Wi) IoU-aware classification logits.
            boxes_init: per level, (N, 4, Hi, Wi) initial distances (l, t, r, b) in
                input-image pixels, float32 (or float64 for a float64 model).
            boxes_refine: per level, (N, 4, Hi, Wi) refined distances, likewise; an empty list
                when refinement is off.
        """
        logits, boxes_init, boxes_refine = [], [], []
        for i, x in enumerate(features):
            memory_format = self.memory_format
            if memory_format is None:
                memory_format = feature_memory_format(x.device)
            x = x.contiguous(memory_format=memory_format)
            cls_feat = self.cls_tower(x)
            reg_feat = self.reg_tower(x)
            # The distances from the convs' outputs on in float32 (or float64), under autocast
            # too: the per-level scales, their gradients (sums over every location) and the exp.
            box = self.reg_init(self.reg_init_conv(reg_feat))
            box = (box.to(torch.promote_types(box.dtype, torch.float32)) * self.scales[i]).exp()
            box = box * self.box_normalizers[i]
            boxes_init.append(box)
            offsets = None
            if self.use_star_dcn:
                # float32 even under autocast: the kernels compute sampling positions from them.
                offsets = star_dcn_offsets(box, self.gradient_mul, self.strides[i])
            if self.use_refine:
                refine = self.reg_refine(self._star_conv(self.reg_refine_conv, reg_feat, offsets))
                refine = (refine.to(box.dtype) * self.scales_refine[i]).exp()
                boxes_refine.append(refine * box.detach())
            logits.append(self.cls_score(self._star_conv(self.cls_conv, cls_feat, offsets)))
        return logits, boxes_init, boxes_refine
