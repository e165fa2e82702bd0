"""
The backbone of MMDetection's RetinaNet for converted checkpoints: Detectron2's RetinaNet
ResNet-FPN (P6 from C5) with P7 computed from P6 without the ReLU that Detectron2 puts between
them (MMDetection's FPN with add_extra_convs='on_input' and relu_before_extra_convs=False, the
official RetinaNet + FL / + VFL models').
"""
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone.fpn import LastLevelP6P7, build_retinanet_resnet_fpn_backbone


class LastLevelP6P7WithoutReLU(LastLevelP6P7):
    """P6 = conv3x3/s2(C5), P7 = conv3x3/s2(P6): Detectron2's parameters, MMDetection's forward."""

    def forward(self, c5):
        p6 = self.p6(c5)
        return [p6, self.p7(p6)]


@BACKBONE_REGISTRY.register()
def build_mmdet_retinanet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    Detectron2's `build_retinanet_resnet_fpn_backbone`, its top block swapped in place (same
    parameters and names) for `LastLevelP6P7WithoutReLU`.
    """
    backbone = build_retinanet_resnet_fpn_backbone(cfg, input_shape)
    backbone.top_block.__class__ = LastLevelP6P7WithoutReLU
    return backbone
