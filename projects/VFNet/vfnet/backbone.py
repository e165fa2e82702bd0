from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import FPN, build_resnet_backbone
from detectron2.modeling.backbone.fpn import LastLevelP6P7


@BACKBONE_REGISTRY.register()
def build_vfnet_resnet_fpn_backbone(cfg, input_shape: ShapeSpec):
    """
    ResNet + FPN on res3-res5 with P6 = conv3x3/s2(P5) and P7 = conv3x3/s2(ReLU(P6)), as the
    official VarifocalNet (P6 from the P5 *output*, unlike RetinaNet's P6 from C5).

    Returns:
        Backbone with outputs p3-p7 (strides 8-128) of MODEL.FPN.OUT_CHANNELS channels.
    """
    bottom_up = build_resnet_backbone(cfg, input_shape)
    out_channels = cfg.MODEL.FPN.OUT_CHANNELS
    return FPN(
        bottom_up=bottom_up,
        in_features=cfg.MODEL.FPN.IN_FEATURES,
        out_channels=out_channels,
        norm=cfg.MODEL.FPN.NORM,
        top_block=LastLevelP6P7(out_channels, out_channels, in_feature="p5"),
        fuse_type=cfg.MODEL.FPN.FUSE_TYPE,
    )
