"""vfnet.solver: the official VarifocalNet's parameter groups (mmcv's) and Detectron2's, by hand."""
import pytest
import torch
from torch import nn

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from vfnet.layers.deform_conv import DeformConv2d  # noqa: E402


class OffsetsBeside(nn.Module):
    """A DCNv2 laid out as Detectron2's DeformBottleneckBlock: the offset conv beside it."""

    def __init__(self):
        super().__init__()
        self.conv2_offset = nn.Conv2d(4, 27, 3, padding=1)
        self.conv2 = DeformConv2d(4, 4, 3, padding=1, bias=True)


class OffsetsInside(DeformConv2d):
    """A DCNv2 laid out as mmcv's ModulatedDeformConv2dPack: the offset conv inside it."""

    def __init__(self):
        super().__init__(4, 4, 3, padding=1, bias=True)
        self.conv_offset = nn.Conv2d(4, 27, 3, padding=1)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gn = nn.GroupNorm(2, 4)
        self.bn = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(4)
        self.dwconv = nn.Conv2d(4, 4, 3, groups=4)  # depthwise: in_channels == groups
        self.beside = OffsetsBeside()
        self.inside = OffsetsInside()
        self.fc = nn.Linear(4, 2)
        self.fc_again = self.fc  # a shared module: its parameters are listed once
        self.scale = nn.Parameter(torch.ones(1))  # as mmcv's Scale / the head's scales
        self.frozen = nn.Conv2d(4, 4, 1)
        self.frozen.requires_grad_(False)


LR, WD, WD_NORM = 0.01, 1e-4, 5e-5  # WD_NORM apart from WD, to tell them apart
BASE, BIAS, NORM = (LR, WD), (2 * LR, 0.0), (LR, WD_NORM)

# mmcv's DefaultOptimizerConstructor, paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.,
# norm_decay_mult=WD_NORM / WD): the biases get lr x2 and no decay, except those of the norm
# layers (lr x1, norm decay) and of the offset convs (lr x1, base decay); a depthwise conv's bias
# gets lr x2 but the base decay (dwconv_decay_mult, unset, comes first).
MMDET = {
    "conv.weight": BASE, "conv.bias": BIAS,
    "gn.weight": NORM, "gn.bias": NORM,
    "bn.weight": NORM, "bn.bias": NORM,
    "ln.weight": NORM, "ln.bias": NORM,
    "dwconv.weight": BASE, "dwconv.bias": (2 * LR, WD),
    "beside.conv2_offset.weight": BASE, "beside.conv2_offset.bias": BASE,
    "beside.conv2.weight": BASE, "beside.conv2.bias": BIAS,
    "inside.weight": BASE, "inside.bias": BIAS,
    "inside.conv_offset.weight": BASE, "inside.conv_offset.bias": BASE,
    "fc.weight": BASE, "fc.bias": BIAS,
    "scale": BASE,
}  # fmt: skip
# Detectron2's get_default_optimizer_params: every parameter named bias gets lr x2 and
# WEIGHT_DECAY_BIAS, the norm layers' weights WEIGHT_DECAY_NORM.
DETECTRON2 = {
    "conv.weight": BASE, "conv.bias": BIAS,
    "gn.weight": NORM, "gn.bias": BIAS,
    "bn.weight": NORM, "bn.bias": BIAS,
    "ln.weight": NORM, "ln.bias": BIAS,
    "dwconv.weight": BASE, "dwconv.bias": BIAS,
    "beside.conv2_offset.weight": BASE, "beside.conv2_offset.bias": BIAS,
    "beside.conv2.weight": BASE, "beside.conv2.bias": BIAS,
    "inside.weight": BASE, "inside.bias": BIAS,
    "inside.conv_offset.weight": BASE, "inside.conv_offset.bias": BIAS,
    "fc.weight": BASE, "fc.bias": BIAS,
    "scale": BASE,
}  # fmt: skip


def solver_cfg(param_groups, *opts):
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_list(
        [
            "SOLVER.PARAM_GROUPS", param_groups,
            "SOLVER.BASE_LR", str(LR),
            "SOLVER.WEIGHT_DECAY", str(WD),
            "SOLVER.WEIGHT_DECAY_NORM", str(WD_NORM),
            "SOLVER.BIAS_LR_FACTOR", "2.0",
            "SOLVER.WEIGHT_DECAY_BIAS", "0.0",
            *opts,
        ]
    )  # fmt: skip
    return cfg


def groups_by_name(optimizer, model):
    names = {id(p): n for n, p in model.named_parameters()}  # lists a shared parameter once
    found = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            assert names[id(p)] not in found, names[id(p)]
            found[names[id(p)]] = (group["lr"], group["weight_decay"])
    return found


@pytest.mark.parametrize("param_groups, expected", [("mmdet", MMDET), ("detectron2", DETECTRON2)])
def test_param_groups_of_a_hand_made_module(param_groups, expected):
    from vfnet.solver import build_optimizer

    model = Tiny()
    optimizer = build_optimizer(solver_cfg(param_groups), model)
    assert type(optimizer) is torch.optim.SGD
    assert groups_by_name(optimizer, model) == expected
    # Parameters of equal settings share one group.
    assert len(optimizer.param_groups) == len(set(expected.values()))


def test_the_default_is_detectron2s_and_an_unknown_value_is_refused():
    from detectron2.config import get_cfg

    import vfnet
    from vfnet.solver import build_optimizer

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    assert cfg.SOLVER.PARAM_GROUPS == "detectron2"
    with pytest.raises(ValueError, match="PARAM_GROUPS"):
        build_optimizer(solver_cfg("mmcv"), Tiny())


@pytest.mark.parametrize("param_groups", ["mmdet", "detectron2"])
def test_gradient_clipping_keeps_working(param_groups):
    from vfnet.solver import build_optimizer

    model = nn.Linear(1, 1)
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    cfg = solver_cfg(
        param_groups,
        "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
        "SOLVER.CLIP_GRADIENTS.CLIP_TYPE", "value",
        "SOLVER.CLIP_GRADIENTS.CLIP_VALUE", "1.0",
    )  # fmt: skip
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.SGD)
    model.weight.grad = torch.full_like(model.weight, 10.0)
    model.bias.grad = torch.full_like(model.bias, 10.0)
    optimizer.step()
    # The gradients clipped to 1 (the weights at 0: no decay term), stepped by each group's lr.
    assert model.weight.item() == pytest.approx(-LR)
    assert model.bias.item() == pytest.approx(-2 * LR)


@pytest.mark.parametrize("param_groups, expected", [("mmdet", MMDET), ("detectron2", DETECTRON2)])
def test_adamw_has_the_same_groups_and_the_configured_betas(param_groups, expected):
    from vfnet.solver import build_optimizer

    model = Tiny()
    cfg = solver_cfg(param_groups, "SOLVER.OPTIMIZER", "AdamW", "SOLVER.BETAS", "(0.8, 0.99)")
    optimizer = build_optimizer(cfg, model)
    assert type(optimizer) is torch.optim.AdamW
    assert groups_by_name(optimizer, model) == expected
    assert all(group["betas"] == (0.8, 0.99) for group in optimizer.param_groups)


def test_adamw_first_step_by_hand():
    # AdamW's first step: the decoupled decay p x (1 - lr x wd), then -lr x m / (sqrt(v) + eps)
    # with the bias-corrected moments m = g, v = g^2: -lr x sign(g), up to eps.
    from vfnet.solver import build_optimizer

    model = nn.Linear(2, 1)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[2.0, -3.0]]))
        model.bias.fill_(0.5)
    cfg = solver_cfg("detectron2", "SOLVER.OPTIMIZER", "AdamW")
    optimizer = build_optimizer(cfg, model)
    model.weight.grad = torch.tensor([[0.3, -7.0]])
    model.bias.grad = torch.tensor([-1e-3])
    optimizer.step()
    torch.testing.assert_close(
        model.weight.detach(),
        torch.tensor([[2.0 * (1 - LR * WD) - LR, -3.0 * (1 - LR * WD) + LR]]),
        rtol=0, atol=1e-6,
    )  # fmt: skip
    # The bias: lr x 2 (BIAS_LR_FACTOR), no decay (WEIGHT_DECAY_BIAS 0).
    torch.testing.assert_close(model.bias.detach(), torch.tensor([0.5 + 2 * LR]), rtol=0, atol=1e-5)


def test_an_unknown_optimizer_is_refused():
    from vfnet.solver import build_optimizer

    with pytest.raises(ValueError, match='SOLVER.OPTIMIZER is "Adam"'):
        build_optimizer(solver_cfg("mmdet", "SOLVER.OPTIMIZER", "Adam"), Tiny())
