"""
The initialisation of neck and head against MMDetection 3.3's (parity environment): its VFNet
R-50-DCN (DCNv2 on the last tower conv), `init_weights()`, converted to Detectron2 names, and
each tensor of FPN and head compared with this project's by a two-sample Kolmogorov-Smirnov test
(the official sizes: 256 channels, 80 classes; every tensor of 100 values or more).

Where MMDetection 3.3 differs from 2.10 (the published models), 2.10 is followed: 3.3's
mmengine calls the `init_weights` of the head's direct children after the head's own init_cfg,
so the box conv (ConvModule `vfnet_reg_conv`) and the two star deformable convs are re-drawn
by their own inits there, where 2.10's VFNetHead.init_weights leaves them normal(0, 0.01). Those
three are checked to differ in 3.3 and to be 2.10's here (tests/modeling/test_init.py checks every tensor
against the official distributions without MMDetection).
"""
import os

import pytest
import torch

mp = pytest.importorskip("dev.mmdet_parity")
pytest.importorskip("mmdet")
stats = pytest.importorskip("scipy.stats")

from helpers import ROOT  # noqa: E402

P_MIN = 1e-4
# Drawn by their own inits in MMDetection 3.3, normal(0, 0.01) in 2.10 (and here).
DIFFERENT_IN_3_3 = {"head.reg_init_conv.weight", "head.reg_refine_conv.weight", "head.cls_conv.weight"}


def p_value(a, b):
    return stats.ks_2samp(a.flatten().double().numpy(), b.flatten().double().numpy()).pvalue


def test_neck_and_head_init_match_mmdet():
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    import vfnet
    from vfnet.checkpoint.converter import convert_mmdet_to_d2

    torch.manual_seed(0)
    mm, mm_cfg = mp.build_mmdet_model("r50_dcn", 80)
    assert mm_cfg.model.bbox_head.dcn_on_last_conv
    mm.init_weights()
    theirs, _ = convert_mmdet_to_d2(mm.state_dict())

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, mp.VARIANTS["r50_dcn"][1]))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", "MODEL.DEVICE", "cpu", "MODEL.VFNET.NUM_CLASSES", "80"])
    ours = build_model(cfg).state_dict()

    compared = []
    for name, t in theirs.items():
        if name.startswith("backbone.bottom_up.") or t.numel() < 100:
            continue
        p = p_value(t, ours[name])
        if name in DIFFERENT_IN_3_3:
            assert p < P_MIN, name
            assert stats.kstest(ours[name].flatten().double().numpy(), "norm", args=(0, 0.01)).pvalue > P_MIN
        else:
            assert p > P_MIN, (name, p)
        compared.append(name)
    # FPN: 3 laterals, 3 outputs, P6, P7 (weights and biases); the head's convs, DCNv2 included.
    assert sum(n.startswith(("backbone.fpn_", "backbone.top_block.")) for n in compared) == 16
    assert {"head.cls_tower.2.conv.weight", "head.cls_tower.2.conv_offset.weight", "head.cls_score.weight"} <= set(compared)
    assert DIFFERENT_IN_3_3 <= set(compared)
