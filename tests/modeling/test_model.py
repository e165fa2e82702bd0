"""The VFNet meta-architecture inside Detectron2: building, training steps and inference."""
import glob
import os
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import BACKBONE_REGISTRY, build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import vfnet  # noqa: E402

from helpers import ROOT, small_cfg  # noqa: E402

CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))


def instances(boxes, classes, size=(96, 128)):
    return Instances(
        size,
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)),
        gt_classes=torch.tensor(classes, dtype=torch.int64),
    )


def batch():
    torch.manual_seed(0)
    return [
        {"image": torch.rand(3, 96, 128) * 255, "instances": instances([[10, 12, 60, 80], [50, 20, 120, 70]], [0, 2])},
        {"image": torch.rand(3, 96, 128) * 255, "instances": instances([[30, 30, 40, 44]], [1])},
    ]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_build_model_from_every_config(path):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    if cfg.MODEL.PAFPNX.BOTTOM_UP not in BACKBONE_REGISTRY:
        pytest.skip(f"MODEL.PAFPNX.BOTTOM_UP {cfg.MODEL.PAFPNX.BOTTOM_UP} is not registered")
    model = build_model(cfg)
    if cfg.MODEL.META_ARCHITECTURE != "VFNet":  # a Detectron2 baseline for comparisons
        assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
        return
    assert isinstance(model, vfnet.VFNet)
    assert model.head.cls_score.out_channels == cfg.MODEL.VFNET.NUM_CLASSES
    strides = [model.backbone.output_shape()[f].stride for f in cfg.MODEL.VFNET.IN_FEATURES]
    assert strides == [8, 16, 32, 64, 128]


def test_r50_head_has_the_official_layers():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    head = sum(p.numel() for p in model.head.parameters())
    # Hand count of the head: 7 conv3x3 256->256 without bias (6 tower convs + the initial-box
    # conv) with GN (2 x 256 each), 2 deformable conv3x3 256->256 without bias, 2 conv3x3 256->4
    # with bias, 1 conv3x3 256->80 with bias, 2 x 5 level scales.
    conv = 256 * 256 * 9
    expected = 7 * (conv + 512) + 2 * conv + 2 * (256 * 4 * 9 + 4) + (256 * 80 * 9 + 80) + 10
    assert head == expected


@pytest.mark.parametrize(
    "opts",
    [
        [],
        ["MODEL.VFNET.CLS_LOSS_TYPE", "focal"],
        ["MODEL.VFNET.CLS_LOSS_TYPE", "quality_focal"],
        ["MODEL.VFNET.USE_STAR_DCN", "False"],
        ["MODEL.VFNET.USE_REFINE", "False"],
        ["MODEL.VFNET.BBOX_NORM_TYPE", "stride"],
        ["MODEL.VFNET.DCN_ON_LAST_CONV", "True"],
    ],
    ids=["default", "focal_loss", "quality_focal_loss", "no_star_dcn", "no_refine", "stride_norm", "dcn_tower"],
)
def test_training_step_gives_finite_losses_and_gradients_on_every_parameter(opts):
    model = build_model(small_cfg(*opts))
    model.train()
    with EventStorage(0):
        losses = model(batch())
    expected = {"loss_cls", "loss_bbox"} | ({"loss_bbox_refine"} if "MODEL.VFNET.USE_REFINE" not in opts else set())
    assert set(losses) == expected
    for name, value in losses.items():
        assert torch.isfinite(value) and value > 0, name
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, f"{name} gets no gradient (unused under DDP)"
            assert torch.isfinite(p.grad).all(), name


def test_image_without_boxes_trains():
    model = build_model(small_cfg())
    model.train()
    data = [{"image": torch.rand(3, 96, 128) * 255, "instances": instances([], [])}]
    with EventStorage(0):
        losses = model(data)
    assert losses["loss_bbox"] == 0 and losses["loss_bbox_refine"] == 0
    assert losses["loss_cls"] > 0
    sum(losses.values()).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    # An image of background teaches the classification score; the refinement only learns from
    # boxes (the initial box still moves a little: the star offsets pass it 10% of the gradient).
    assert model.head.cls_score.weight.grad.abs().sum() > 0
    assert model.head.reg_refine.weight.grad.abs().sum() == 0
    assert model.head.reg_init.weight.grad.abs().sum() > 0


def test_inference_returns_instances_in_original_image_coordinates():
    model = build_model(
        small_cfg("MODEL.VFNET.TEST_SCORE_THRESH", "0.0", "MODEL.VFNET.TEST_NMS_THRESH", "1.0")
    )
    model.eval()
    torch.manual_seed(1)
    image = torch.rand(3, 96, 128) * 255
    with torch.no_grad():
        raw = model([{"image": image}])[0]["instances"]  # no height/width: input coordinates
        out = model([{"image": image, "height": 192, "width": 384}])[0]["instances"]
    assert len(out) == len(raw) == 100
    assert set(out.get_fields()) == {"pred_boxes", "scores", "pred_classes"}
    assert out.image_size == (192, 384)
    scale = torch.tensor([384 / 128, 192 / 96, 384 / 128, 192 / 96])
    torch.testing.assert_close(out.pred_boxes.tensor, raw.pred_boxes.tensor * scale)
    torch.testing.assert_close(out.scores, raw.scores)
    assert (out.pred_boxes.tensor[:, 0::2] <= 384).all() and (out.pred_boxes.tensor[:, 1::2] <= 192).all()
    assert (out.pred_boxes.tensor >= 0).all()
    assert (out.scores[:-1] >= out.scores[1:]).all()
    assert out.pred_classes.max() < 3


def test_inference_decodes_refined_boxes_from_the_locations():
    """Detections equal a direct decode of the head's outputs at the kept locations."""
    model = build_model(small_cfg("MODEL.VFNET.TEST_SCORE_THRESH", "0.0", "MODEL.VFNET.TEST_NMS_THRESH", "1.0"))
    model.eval()
    torch.manual_seed(2)
    image = torch.rand(3, 96, 128) * 255
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
        images = model.preprocess_image([{"image": image}])
        features = model.backbone(images.tensor)
        logits, _, refine = model.head([features[f] for f in model.head_in_features])
    # The top detection: find its (level, location, class) by score and decode it by hand.
    best = out.scores[0]
    for level, (lg, rf) in enumerate(zip(logits, refine)):
        stride = 8 * 2**level
        hit = (lg[0].sigmoid() == best).nonzero()
        if len(hit):
            c, y, x = hit[0].tolist()
            l, t, r, b = rf[0, :, y, x].tolist()
            cx, cy = x * stride, y * stride
            expected = torch.tensor([cx - l, cy - t, cx + r, cy + b]).clamp(min=0)
            expected[0::2] = expected[0::2].clamp(max=128)
            expected[1::2] = expected[1::2].clamp(max=96)
            torch.testing.assert_close(out.pred_boxes.tensor[0], expected)
            assert out.pred_classes[0] == c
            return
    pytest.fail("top score not found in the head outputs")


def test_deform_conv_kernels_give_the_same_losses_and_gradients_in_float64():
    """The CPU kernels inside the whole model (channels-last head, DCNv2 tower convs, star offsets
    reaching outside the maps) against torchvision's, losses and every parameter's gradient."""
    import copy

    from vfnet.layers.deform_conv import DeformConv2d

    torch.manual_seed(0)
    model = build_model(small_cfg("MODEL.VFNET.DCN_ON_LAST_CONV", "True")).double().train()
    with torch.no_grad():  # varied star offsets and DCNv2 offsets/masks
        for p in model.head.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    results = {}
    for impl in ("torchvision", "gather", "sampling"):
        m = copy.deepcopy(model)
        for layer in m.modules():
            if isinstance(layer, DeformConv2d):
                layer.impl = impl
        with EventStorage(0):
            losses = m(batch())
        sum(losses.values()).backward()
        results[impl] = losses, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    ref_losses, ref_grads = results.pop("torchvision")
    assert len(ref_grads) == sum(p.requires_grad for p in model.parameters())
    for losses, grads in results.values():
        for k in ref_losses:
            torch.testing.assert_close(losses[k], ref_losses[k], rtol=1e-10, atol=1e-12)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_and_cpu_deform_conv_paths_agree():
    from vfnet.layers.deform_conv import DeformConv2d

    torch.manual_seed(0)
    layer = DeformConv2d(16, 8, impl="auto")
    x = torch.randn(2, 16, 12, 10, requires_grad=True)
    offset = torch.randn(2, 18, 12, 10, requires_grad=True)
    out_cpu = layer(x, offset)
    out_cpu.square().sum().backward()
    grads_cpu = [x.grad.clone(), offset.grad.clone(), layer.weight.grad.clone()]
    layer.cuda()
    xc, oc = x.detach().cuda().requires_grad_(), offset.detach().cuda().requires_grad_()
    layer.weight.grad = None
    out_cuda = layer(xc, oc)
    out_cuda.square().sum().backward()
    torch.testing.assert_close(out_cuda.cpu(), out_cpu, rtol=1e-4, atol=1e-4)
    for g_cpu, g_cuda in zip(grads_cpu, [xc.grad, oc.grad, layer.weight.grad]):
        torch.testing.assert_close(g_cuda.cpu(), g_cpu, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("modulated", [True, False])
def test_dcn_backbone_runs_and_trains_on_cpu(modulated):
    import torch.nn.functional as F

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_DCN_FPN_MS_2x.yaml"))
    cfg.merge_from_list(
        ["MODEL.DEVICE", "cpu", "MODEL.RESNETS.DEFORM_MODULATED", str(modulated), "MODEL.VFNET.NUM_CLASSES", "3"]
    )
    cfg.merge_from_list(["MODEL.RESNETS.STRIDE_IN_1X1", "False"])  # stride 2 in the deformable conv
    model = build_model(cfg)
    block = model.backbone.bottom_up.res3[0]
    x = torch.randn(1, block.conv2.weight.shape[1], 16, 20)
    zero = torch.zeros(1, 18, 8, 10)
    # With zero offsets (and a mask of 1), a deformable conv is the plain strided conv.
    args = (x, zero, torch.ones(1, 9, 8, 10)) if modulated else (x, zero)
    expected = block.conv2.norm(F.conv2d(x, block.conv2.weight, None, stride=2, padding=1))
    torch.testing.assert_close(block.conv2(*args), expected, rtol=1e-4, atol=1e-4)
    model.train()
    with EventStorage(0):
        losses = model(batch()[:1])
    sum(losses.values()).backward()
    assert block.conv2.weight.grad is not None and torch.isfinite(block.conv2.weight.grad).all()


def test_cpu_batch_is_channels_last_and_computes_what_nchw_does(monkeypatch):
    """On CPU the backbone gets a channels-last batch (oneDNN's convolutions skip their layout
    reorders: docs/BENCHMARKS.md), at 800x1333 with R-50: the padded batch holds the same values,
    and the features and the head's outputs equal those of the NCHW batch to float32 rounding."""
    from vfnet.modeling.meta_arch import vfnet as meta_arch

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_FPN_1x.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    inputs = [{"image": torch.rand(3, 800, 1333) * 255}]

    def run():
        with torch.no_grad():
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            head = model.head([features[f] for f in model.head_in_features])
        return images.tensor, [features[f] for f in model.head_in_features], [t for out in head for t in out]

    cl_images, cl_features, cl_head = run()
    monkeypatch.setattr(meta_arch, "feature_memory_format", lambda device: torch.contiguous_format)
    images, features, head = run()
    assert cl_images.is_contiguous(memory_format=torch.channels_last) and images.is_contiguous()
    assert torch.equal(cl_images, images)
    for ours, ref in zip(cl_features + cl_head, features + head):
        assert (ours - ref).abs().max() <= 1e-4 * ref.abs().max(), ref.shape
