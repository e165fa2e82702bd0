"""
vfnet.layers.batch_norm (frozen running statistics, trainable affine) and MODEL.BACKBONE.NORM_EVAL
in the backbone builder.
"""
import torch
from detectron2.layers import FrozenBatchNorm2d
from torch import nn

from vfnet.layers import FrozenStatsBatchNorm2d, freeze_batchnorm_statistics


def _bn(c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(c, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)
    return bn


def test_normalises_with_running_statistics_in_training_and_trains_the_affine():
    bn = _bn()
    mean, var = bn.running_mean.clone(), bn.running_var.clone()
    block = freeze_batchnorm_statistics(nn.Sequential(nn.Conv2d(3, 3, 1), bn))
    assert type(block[1]) is FrozenStatsBatchNorm2d
    block.train()
    assert block.training and not block[1].training
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(1))
    y = bn(x)
    # The formula, by hand: (x - mean) / sqrt(var + eps) * weight + bias.
    shape = (1, -1, 1, 1)
    expected = (x - mean.view(shape)) / (var.view(shape) + bn.eps).sqrt() * bn.weight.view(shape) + bn.bias.view(shape)
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(bn.running_mean, mean) and torch.equal(bn.running_var, var)
    y.square().sum().backward()
    assert bn.weight.grad.abs().min() > 0 and bn.bias.grad.abs().min() > 0
    # d(sum y^2)/d bias = 2 sum y per channel.
    torch.testing.assert_close(bn.bias.grad, 2 * y.detach().sum(dim=(0, 2, 3)))


def test_conversion_keeps_the_state_and_other_norms():
    bn, gn, frozen = _bn(), nn.GroupNorm(1, 3), FrozenBatchNorm2d(3)
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    freeze_batchnorm_statistics(nn.ModuleList([bn, gn, frozen]))
    assert type(gn) is nn.GroupNorm and type(frozen) is FrozenBatchNorm2d
    assert all(torch.equal(v, bn.state_dict()[k]) for k, v in state.items())


def test_backbone_norm_eval_official_r50():
    """NORM "BN" + NORM_EVAL + FREEZE_AT 2 = mmdet's frozen_stages=1, norm_eval, BN(requires_grad)."""
    from detectron2.config import get_cfg
    from detectron2.layers import ShapeSpec

    from vfnet.config import add_vfnet_config
    from vfnet.modeling.backbone.resnet_fpn import build_vfnet_resnet_fpn_backbone

    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file("configs/Base-VFNet.yaml")
    cfg.MODEL.RESNETS.NORM, cfg.MODEL.BACKBONE.NORM_EVAL, cfg.MODEL.BACKBONE.FREEZE_AT = "BN", True, 2
    bottom_up = build_vfnet_resnet_fpn_backbone(cfg, ShapeSpec(channels=3)).bottom_up.train()
    for name, m in bottom_up.named_modules():
        if name.startswith(("stem", "res2")):
            assert not isinstance(m, nn.BatchNorm2d) and all(not p.requires_grad for p in m.parameters(recurse=False)), name
        elif isinstance(m, nn.BatchNorm2d):
            assert type(m) is FrozenStatsBatchNorm2d and not m.training and m.weight.requires_grad, name
    # res3-res5 of R-50: (4 + 6 + 3) blocks x 3 BN + 3 shortcut BN.
    assert sum(isinstance(m, FrozenStatsBatchNorm2d) for m in bottom_up.modules()) == 13 * 3 + 3
