"""
The CUDA path on CPU: Detectron2's deformable CUDA kernels are replaced by stand-ins that assert
what the kernels assume (NCHW-contiguous inputs, one dtype, one device) and compute with
torchvision's `deform_conv2d`; the CUDA branch of the backbone's DCN stages is forced. The head
and backbone of VFNet_R_101_DCN_FPN_MS_2x.yaml (shrunk) then run through them, forward and
backward, and must give the gather kernel's results.
"""
import copy
import os

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

import detectron2.layers.deform_conv as d2_deform_conv  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.layers import DeformConv, ModulatedDeformConv, ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import vfnet  # noqa: E402
from vfnet.layers import DeformConv2d  # noqa: E402
from vfnet.modeling.backbone import resnet_fpn  # noqa: E402
from vfnet.modeling.vfnet_head import VFNetHead, feature_memory_format  # noqa: E402

from helpers import ROOT, SMALL, stand_in_deform_conv, stand_in_modulated_deform_conv  # noqa: E402

DCN_CONFIG = os.path.join(ROOT, "configs", "VFNet_R_101_DCN_FPN_MS_2x.yaml")
# R-50 (Detectron2's R-18 has no DCN blocks) of width 8 x 1, 32-channel FPN and head.
SHRINK = [
    "MODEL.RESNETS.DEPTH", "50",
    "MODEL.RESNETS.WIDTH_PER_GROUP", "8",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "32",
    "MODEL.FPN.OUT_CHANNELS", "32",
    "MODEL.VFNET.DEFORM_CONV_IMPL", "detectron2",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small tensors: one thread is faster than a pool that waits for a shared machine's cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def cuda_kernels(monkeypatch):
    """Detectron2's CUDA kernels replaced by the stand-ins; the DCN stages take their CUDA branch."""
    monkeypatch.setattr(d2_deform_conv, "deform_conv", stand_in_deform_conv)
    monkeypatch.setattr(d2_deform_conv, "modulated_deform_conv", stand_in_modulated_deform_conv)
    monkeypatch.setattr(resnet_fpn, "runs_detectron2_kernel", lambda x: True)


def dcn_cfg():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(DCN_CONFIG)
    cfg.merge_from_list(SMALL + SHRINK)
    assert cfg.MODEL.VFNET.DCN_ON_LAST_CONV and any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE)
    torch.manual_seed(0)
    return cfg


def dcn_head():
    """The head of the shrunk model alone, for P3-P7 features of 32 channels."""
    return VFNetHead(dcn_cfg(), [ShapeSpec(channels=32, stride=2**i) for i in range(3, 8)])


def with_gather_kernels(model):
    """A copy of `model` whose head runs the gather kernel (and its backbone torchvision's)."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, DeformConv2d):
            m.impl = "gather"
    return model


def training_batch():
    # 160x192: P7 is 2x2, so that no group of the head's GroupNorm holds a single value (whose
    # normalised value is rounding noise, and the ReLU's gradient its sign).
    g = torch.Generator().manual_seed(1)
    boxes = [[[12.0, 16, 100, 80], [60, 40, 180, 120]], [[20.0, 8, 80, 150]]]
    return [
        {"image": torch.rand(3, 160, 192, generator=g) * 255,
         "instances": Instances((160, 192), gt_boxes=Boxes(torch.tensor(b)), gt_classes=torch.arange(len(b)))}
        for b in boxes
    ]  # fmt: skip


def relative_error(a, b):
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_the_features_are_channels_last_on_cpu_only():
    assert feature_memory_format(torch.device("cpu")) == torch.channels_last
    assert feature_memory_format(torch.device("cuda")) == torch.contiguous_format
    assert feature_memory_format("cuda:1") == torch.contiguous_format


def test_the_dcn_model_trains_through_detectron2s_kernels_as_through_gather(cuda_kernels):
    model = build_model(dcn_cfg()).train()
    assert any(type(m) is resnet_fpn.AnyDeviceModulatedDeformConv for m in model.modules())
    reference = with_gather_kernels(model)
    batch = training_batch()
    with EventStorage(0):
        losses = model(batch)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(resnet_fpn, "runs_detectron2_kernel", lambda x: False)
            expected = reference(batch)
    assert losses.keys() == expected.keys()
    for k in losses:
        assert relative_error(losses[k], expected[k]) < 1e-4, k
    sum(losses.values()).backward()
    sum(expected.values()).backward()
    grads = dict(reference.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is not None or grads[name].grad is not None:
            assert relative_error(p.grad, grads[name].grad) < 1e-3, name


@pytest.mark.parametrize("memory_format", [None, torch.contiguous_format], ids=["channels-last", "nchw"])
@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
def test_the_dcn_head_runs_detectron2s_kernels_in_any_memory_format(cuda_kernels, memory_format, autocast):
    head = dcn_head()
    head.memory_format = memory_format  # None: channels-last on CPU
    reference = with_gather_kernels(head)  # in float32
    g = torch.Generator().manual_seed(2)
    features = [torch.randn(2, 32, s, s * 3 // 2, generator=g) for s in (16, 8, 4, 2, 2)]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = head(features)
    expected = reference(features)
    sum(x.float().square().mean() for x in sum(out, [])).backward()
    sum(x.square().mean() for x in sum(expected, [])).backward()
    for a, b in zip(sum(out, []), sum(expected, [])):
        assert relative_error(a, b) < (2e-2 if autocast else 1e-4)  # bf16 rounding: about 5e-3
    grads = dict(reference.named_parameters())
    for name, p in head.named_parameters():
        if autocast:  # the gradients of bf16 convs: only finite (offset gradients differ by ~20%)
            assert torch.isfinite(p.grad).all(), name
        else:
            assert relative_error(p.grad, grads[name].grad) < 1e-3, name


@pytest.mark.parametrize("modulated", [False, True], ids=["DCN", "DCNv2"])
@pytest.mark.parametrize("case", ["channels-last", "bf16-autocast"])
def test_backbone_deform_conv_feeds_detectron2s_kernel_nchw_in_its_weight_dtype(
    cuda_kernels, monkeypatch, modulated, case
):
    # A layer of the DCN stages given channels-last inputs, or bf16 ones under autocast (its
    # weight is float32): the CUDA branch against the torchvision one.
    torch.manual_seed(0)
    layer = (ModulatedDeformConv if modulated else DeformConv)(8, 8, 3, padding=1)
    layer.__class__ = resnet_fpn.AnyDeviceModulatedDeformConv if modulated else resnet_fpn.AnyDeviceDeformConv
    g = torch.Generator().manual_seed(3)
    shapes = [(2, 8, 6, 7), (2, 18, 6, 7)] + ([(2, 9, 6, 7)] if modulated else [])
    inputs = [torch.randn(s, generator=g) for s in shapes]  # x, offset, mask
    inputs[1] = inputs[1] * 2
    if modulated:
        inputs[2] = inputs[2].sigmoid()
    if case == "channels-last":
        inputs = [t.contiguous(memory_format=torch.channels_last) for t in inputs]
    else:
        inputs[:2] = [t.bfloat16() for t in inputs[:2]]
    inputs = [t.requires_grad_() for t in inputs]
    results = []
    for cuda_branch in (True, False):
        for t in inputs + [layer.weight]:
            t.grad = None
        monkeypatch.setattr(resnet_fpn, "runs_detectron2_kernel", lambda x, on=cuda_branch: on)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16-autocast"):
            out = layer(*inputs)
        out.float().square().sum().backward()
        results.append([out] + [t.grad for t in inputs + [layer.weight]])
    for ours, expected in zip(*results):
        assert ours.dtype == expected.dtype
        assert relative_error(ours, expected) < 1e-5
