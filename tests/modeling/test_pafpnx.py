"""PAFPNX (VFNet-X's neck) against a re-computation of the official forward with plain torch ops."""
import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import deform_conv2d

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_backbone

import vfnet
from vfnet.modeling.backbone.pafpnx import PAFPNX


class GivenFeatures(Backbone):
    """A bottom-up backbone that returns the features it was given (res3-res5)."""

    def __init__(self, features):
        super().__init__()
        self.features = features

    def output_shape(self):
        return {k: ShapeSpec(channels=v.shape[1], stride=2 ** (3 + i)) for i, (k, v) in enumerate(self.features.items())}

    def forward(self, x):
        return self.features


def group_norm(x, gn):
    return F.group_norm(x, 32, gn.weight, gn.bias, gn.eps)


def conv_gn(x, conv, stride=1):
    """Official ConvModule: conv3x3 (no bias) -> GN, no activation."""
    assert conv.bias is None
    return group_norm(F.conv2d(x, conv.weight, None, stride, 1), conv.norm)


def dcn_gn(x, block):
    """mmcv's ModulatedDeformConv2dPack -> GN: offsets (o1, o2) and sigmoid mask from one 3x3 conv."""
    out = F.conv2d(x, block.conv_offset.weight, block.conv_offset.bias, 1, 1)
    o1, o2, m = out.chunk(3, dim=1)
    y = deform_conv2d(x, torch.cat([o1, o2], 1), block.conv.weight, None, padding=1, mask=m.sigmoid())
    return group_norm(y, block.norm)


def reference_forward(neck, c):
    """The official PAFPNX.forward (start_level 1, add_extra_convs 'on_output', ReLU before P7)."""
    laterals = [F.conv2d(x, conv.weight, conv.bias) for x, conv in zip(c, neck.lateral_convs)]
    for i in (2, 1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    inter = [conv_gn(lat, conv) for lat, conv in zip(laterals, neck.fpn_convs)]
    for i in (0, 1):
        inter[i + 1] = inter[i + 1] + conv_gn(inter[i], neck.downsample_convs[i], stride=2)
    outs = [dcn_gn(f, block) for f, block in zip(inter, neck.pafpn_convs)]
    outs.append(conv_gn(outs[-1], neck.p6, stride=2))
    outs.append(conv_gn(F.relu(outs[-1]), neck.p7, stride=2))
    return outs


def perturbed_neck(h, w, channels=64, in_channels=(32, 48, 64), impl="auto", dtype=torch.float64):
    g = torch.Generator().manual_seed(0)
    feats = {
        f"res{3 + i}": torch.randn(1, ch, -(-h // 2 ** (3 + i)), -(-w // 2 ** (3 + i)), generator=g, dtype=dtype)
        for i, ch in enumerate(in_channels)
    }
    neck = PAFPNX(bottom_up=GivenFeatures(feats), in_features=list(feats), out_channels=channels, norm="GN", deform_conv_impl=impl)
    neck = neck.to(dtype)
    with torch.no_grad():
        for name, p in neck.named_parameters():
            # Every tensor perturbed (offsets of a few pixels, GN affine away from 1 / 0).
            scale = 0.05 if "conv_offset" in name else 0.1
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=dtype))
    return neck, list(feats.values())


@pytest.mark.parametrize("h,w", [(64, 96), (61, 83)])
def test_forward_equals_the_official_computation(h, w):
    neck, c = perturbed_neck(h, w)
    ours = neck(None)
    ref = reference_forward(neck, c)
    assert list(ours) == ["p3", "p4", "p5", "p6", "p7"]
    for (name, a), b in zip(ours.items(), ref):
        assert a.shape == b.shape, name
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)
    # The perturbed offsets deform: a plain 3x3 conv in place of the DCN gives another P3.
    block = neck.pafpn_convs[0]
    plain = group_norm(F.conv2d(_inter0(neck, c), block.conv.weight, None, 1, 1), block.norm)
    assert not torch.allclose(plain, ours["p3"], atol=1e-3)


def _inter0(neck, c):
    """F_3 of the reference (the input of the first DCN)."""
    laterals = [F.conv2d(x, conv.weight, conv.bias) for x, conv in zip(c, neck.lateral_convs)]
    for i in (2, 1):
        laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:], mode="nearest")
    return conv_gn(laterals[0], neck.fpn_convs[0])


def test_forward_at_800x1333_with_384_channels():
    neck, c = perturbed_neck(800, 1344, channels=384, in_channels=(512, 1024, 2048), dtype=torch.float32)
    with torch.no_grad():
        ours = neck(None)
        ref = reference_forward(neck, c)
    for (name, a), b in zip(ours.items(), ref):
        assert a.shape == (1, 384, -(-800 // neck._out_feature_strides[name]), -(-1344 // neck._out_feature_strides[name])), name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=name)


def test_built_from_config_over_the_resnet_bottom_up():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "build_vfnet_pafpnx_backbone"
    cfg.MODEL.RESNETS.DEPTH = 50
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE = [False, True, True, True]
    cfg.MODEL.RESNETS.DEFORM_MODULATED = True
    backbone = build_backbone(cfg)
    assert isinstance(backbone, PAFPNX)
    shapes = backbone.output_shape()
    assert {k: (s.channels, s.stride) for k, s in shapes.items()} == {f"p{i}": (384, 2 ** i) for i in range(3, 8)}
    assert backbone.size_divisibility == 128
    # No norm on the laterals (with bias), GN(32) without bias on every other conv.
    assert all(conv.norm is None and conv.bias is not None for conv in backbone.lateral_convs)
    for conv in [*backbone.fpn_convs, *backbone.downsample_convs, backbone.p6, backbone.p7]:
        assert isinstance(conv.norm, torch.nn.GroupNorm) and conv.norm.num_groups == 32 and conv.bias is None
    out = backbone(torch.randn(1, 3, 128, 160))
    assert [tuple(v.shape[-2:]) for v in out.values()] == [(16, 20), (8, 10), (4, 5), (2, 3), (1, 2)]
    cfg.MODEL.PAFPNX.BOTTOM_UP = "no_such_backbone"
    with pytest.raises(KeyError, match="no_such_backbone"):
        build_backbone(cfg)


def test_in_features_whose_strides_do_not_double_are_refused():
    feats = {"res3": torch.zeros(1, 8, 8, 8), "res5": torch.zeros(1, 8, 2, 2)}
    bottom_up = GivenFeatures(feats)
    bottom_up.output_shape = lambda: {"res3": ShapeSpec(channels=8, stride=8), "res5": ShapeSpec(channels=8, stride=32)}
    with pytest.raises(ValueError, match="MODEL.PAFPNX.IN_FEATURES"):
        PAFPNX(bottom_up=bottom_up, in_features=["res3", "res5"], out_channels=32)
