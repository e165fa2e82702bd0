"""
open-mmlab's ImageNet ResNeXt-101 (open-mmlab://resnext101_32x4d / 64x4d, the weights of the
official VFNet_X_101_* configs) converted with convert_imagenet_backbone (the tool's --imagenet):
MMDetection 3.3's ResNeXt (random weights and BatchNorm statistics, its keys as in those files)
and the Detectron2 ResNeXt of configs/VFNet_X_101_32x4d_FPN_MS_2x.yaml compute the same
res3-res5 features in float64 (parity environment). The torchvision ResNets:
tests/checkpoint/test_imagenet_backbones.py.
"""
import os

import pytest
import torch

mp = pytest.importorskip("dev.mmdet_parity")
pytest.importorskip("mmdet")

from helpers import ROOT  # noqa: E402


def d2_cfg(config):
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""])
    return cfg


@pytest.mark.parametrize("groups, config", [(32, "VFNet_X_101_32x4d_FPN_MS_2x.yaml"), (64, "VFNet_X_101_64x4d_FPN_MS_2x.yaml")])
def test_converted_resnext101_computes_mmdets_features(groups, config):
    from detectron2.modeling import build_backbone

    from vfnet.checkpoint.converter import check_against_model, convert_imagenet_backbone

    mp.install_mmcv_ops_standins()
    from mmdet.models.backbones import ResNeXt

    torch.manual_seed(0)
    theirs = ResNeXt(depth=101, groups=groups, base_width=4, out_indices=(1, 2, 3), norm_eval=True)
    mp.perturb_(theirs, 0)
    imagenet = dict(theirs.state_dict())
    imagenet["fc.weight"], imagenet["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    converted, report = convert_imagenet_backbone(imagenet)
    assert report["dropped"].count("backbone.fc.weight") == 1
    path = os.path.join(ROOT, "configs", config)
    assert check_against_model(converted, path, prefix="backbone.bottom_up.") == []
    if groups == 64:  # the same conversion; one feature comparison (32x4d) is enough
        return
    bottom_up = build_backbone(d2_cfg(config)).bottom_up
    prefix = "backbone.bottom_up."
    missing, unexpected = bottom_up.load_state_dict({k[len(prefix):]: v for k, v in converted.items()}, strict=False)
    assert unexpected == [] and all(k.endswith("num_batches_tracked") for k in missing)
    bottom_up.double().eval()
    theirs.double().eval()
    x = torch.randn(1, 3, 320, 480, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with torch.no_grad():
        ours, ref = bottom_up(x), theirs(x)
    for name, r in zip(("res3", "res4", "res5"), ref):
        torch.testing.assert_close(ours[name], r, rtol=1e-9, atol=1e-9 * r.abs().max().item())
