"""
The initialisation of what trains from scratch (neck and head), as the official VarifocalNet
(MMDetection 2.10) does it, at the official sizes (R-50 FPN of 256 channels, DCN on the last
tower conv; VFNet-X's PAFPNX of 384): each tensor against the distribution the official code
draws it from, by a Kolmogorov-Smirnov test, the bounds computed here from the shapes:

- FPN / PAFPNX (FPN.init_weights): every nn.Conv2d xavier-uniform, +-sqrt(6 / (fan_in +
  fan_out)), zero bias; in PAFPNX the offset convs of its DCNv2 too (they are nn.Conv2d inside
  mmcv's ModulatedDeformConv2dPack), while the DCNv2 weights keep mmcv's init.
- head (VFNetHead.init_weights): normal(0, 0.01) for the convs whose `.conv` is an nn.Conv2d and
  for the star deformable convs, zero bias, the classifier's bias at the 0.01 prior; the last tower
  conv (ModulatedDeformConv2dPack) keeps mmcv's ModulatedDeformConv2d.init_weights: uniform in
  +-1/sqrt(in_channels x 9), zero offsets.

Detectron2's own FPN init (c2_xavier_fill: +-sqrt(3 / fan_in)) has the xavier bound of the 3x3
convs (fan_in = fan_out) but not of the 1x1 laterals: the lateral tests tell them apart (checked
below). tests/parity/test_mmdet_parity_init.py compares the same tensors with MMDetection 3.3's init.
"""
import math

import pytest
import torch
from scipy import stats

from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from vfnet.modeling.backbone.pafpnx import PAFPNX
from vfnet.modeling.vfnet_head import ModulatedDeformConvBlock, VFNetHead

from helpers import BASE_CONFIG
from helpers import load_config as load

P_MIN = 1e-4  # a KS p-value below it rejects the distribution


def uniform_p(weight, bound):
    return stats.kstest(weight.detach().flatten().double().numpy(), "uniform", args=(-bound, 2 * bound)).pvalue


def normal_p(weight, std):
    return stats.kstest(weight.detach().flatten().double().numpy(), "norm", args=(0.0, std)).pvalue


def fans(conv):
    out_c, in_c, kh, kw = conv.weight.shape
    return in_c * kh * kw, out_c * kh * kw


def xavier_bound(conv):
    fan_in, fan_out = fans(conv)
    return math.sqrt(6.0 / (fan_in + fan_out))


def assert_xavier(conv, name):
    bound = xavier_bound(conv)
    assert uniform_p(conv.weight, bound) > P_MIN, name
    assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.99 * bound, name
    assert conv.bias is None or not conv.bias.any(), name


@pytest.fixture(scope="module")
def r50_fpn():
    torch.manual_seed(0)
    cfg = load("VFNet_R_50_FPN_1x.yaml", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu")
    return build_backbone(cfg)


def test_fpn_convs_are_xavier_uniform(r50_fpn):
    convs = {n: m for n, m in r50_fpn.named_modules() if isinstance(m, torch.nn.Conv2d) and not n.startswith("bottom_up.")}
    assert sorted(convs) == sorted(
        [f"fpn_lateral{i}" for i in (3, 4, 5)] + [f"fpn_output{i}" for i in (3, 4, 5)] + ["top_block.p6", "top_block.p7"]
    )
    for name, conv in convs.items():
        assert_xavier(conv, name)
    # Detectron2's c2_xavier_fill would be rejected: the lateral of res5 (2048 -> 256) has
    # bound sqrt(3 / 2048) = 0.038 there, xavier sqrt(6 / 2304) = 0.051.
    lateral = convs["fpn_lateral5"]
    assert uniform_p(lateral.weight, math.sqrt(3.0 / fans(lateral)[0])) < P_MIN


def test_head_follows_the_official_init():
    torch.manual_seed(0)
    shapes = [ShapeSpec(channels=256, stride=s) for s in (8, 16, 32, 64, 128)]
    head = VFNetHead(input_shape=shapes, num_classes=80, num_convs=3, norm="GN", dcn_on_last_conv=True)
    for tower in (head.cls_tower, head.reg_tower):
        for conv in tower[:-1]:
            assert normal_p(conv.weight, 0.01) > P_MIN and conv.bias is None
        block = tower[-1]
        assert isinstance(block, ModulatedDeformConvBlock)
        bound = 1 / math.sqrt(256 * 9)
        assert uniform_p(block.conv.weight, bound) > P_MIN and normal_p(block.conv.weight, 0.01) < P_MIN
        assert not block.conv_offset.weight.any() and not block.conv_offset.bias.any()
    for name in ("reg_init_conv", "reg_init", "reg_refine_conv", "reg_refine", "cls_conv", "cls_score"):
        conv = getattr(head, name)
        assert normal_p(conv.weight, 0.01) > P_MIN, name
    assert not head.reg_init.bias.any() and not head.reg_refine.bias.any()
    assert torch.allclose(head.cls_score.bias, torch.full((80,), -math.log(99.0)))


def test_pafpnx_convs_and_dcn_offsets_are_xavier_uniform():
    torch.manual_seed(0)
    cfg = load(
        "VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml", "MODEL.PAFPNX.BOTTOM_UP", "build_resnet_backbone",
        "MODEL.RESNETS.DEPTH", "50", "MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu",
    )  # fmt: skip
    neck = build_backbone(cfg)
    assert isinstance(neck, PAFPNX)
    convs = [*neck.lateral_convs, *neck.fpn_convs, *neck.downsample_convs, neck.p6, neck.p7]
    for i, conv in enumerate(convs):
        assert_xavier(conv, i)
    bound = 1 / math.sqrt(384 * 9)
    for block in neck.pafpn_convs:
        assert_xavier(block.conv_offset, "conv_offset")
        assert uniform_p(block.conv.weight, bound) > P_MIN
