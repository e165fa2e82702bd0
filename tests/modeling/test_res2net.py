"""
The Res2Net backbone (vfnet/modeling/backbone/res2net.py): its stem and Bottle2neck blocks against
a re-computation written here with torch.nn.functional ops from the same weights (the v1d
average-pool shortcut, the first block's separate splits and pooled last split, the DCNv2
variant), the builder's structure and freezing, and a VFNet with Res2Net-50 that trains,
evaluates (tools/train_net.py --eval-only) and exports. MMDetection's own Res2Net is compared in
tests/parity/test_mmdet_parity_res2net.py.
"""

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.layers import FrozenBatchNorm2d, ShapeSpec  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from torchvision.ops import deform_conv2d  # noqa: E402

from vfnet.modeling.backbone import build_res2net_backbone  # noqa: E402
from vfnet.modeling.backbone.res2net import Bottle2neckBlock, Res2NetStem  # noqa: E402

from helpers import small_cfg, tiny_shapes  # noqa: E402
from helpers import train_net as run_train_net  # noqa: E402

R2 = ["MODEL.BACKBONE.NAME", "build_vfnet_res2net_fpn_backbone", "MODEL.RESNETS.DEPTH", "50"]


# ------------------------------------------------------------------------------ the reference
def randomize_(module, seed=0):
    """Random weights, BN statistics and affine; offset convs large enough to move the samples."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif "offset" in name:
                t.copy_(torch.randn(t.shape, generator=g) * 0.3)
            elif t.dtype.is_floating_point:
                t.copy_(torch.randn(t.shape, generator=g) * (0.1 if t.dim() == 4 else 0.5))
    return module.eval()


def ref_norm(x, conv):
    """Batch norm with frozen statistics, by its formula."""
    n = conv.norm
    scale = n.weight / torch.sqrt(n.running_var + n.eps)
    return (x - n.running_mean[:, None, None]) * scale[:, None, None] + n.bias[:, None, None]


def ref_conv(x, conv, stride=1, padding=0):
    return ref_norm(F.conv2d(x, conv.weight, None, stride, padding), conv)


def ref_avg_pool(x, k, stride, padding, count_padding):
    """Average pool as a sum over a window of zero-padded input, divided by the window's size or
    by its count of real pixels; the right/bottom zero padding reaches ceil(size / stride) windows.
    """
    c, (h, w) = x.shape[1], x.shape[-2:]
    oh = (
        -(-(h + 2 * padding - k) // stride) + 1
        if not count_padding
        else (h + 2 * padding - k) // stride + 1
    )
    ow = (
        -(-(w + 2 * padding - k) // stride) + 1
        if not count_padding
        else (w + 2 * padding - k) // stride + 1
    )
    ph, pw = (oh - 1) * stride + k - h - padding, (ow - 1) * stride + k - w - padding
    xp = F.pad(x, (padding, pw, padding, ph))
    ones = torch.ones(c, 1, k, k, dtype=x.dtype)
    sums = F.conv2d(xp, ones, stride=stride, groups=c)
    if count_padding:
        return sums / (k * k)
    real = F.conv2d(
        F.pad(torch.ones_like(x[:, :1]), (padding, pw, padding, ph)), ones[:1], stride=stride
    )
    return sums / real


def ref_split_conv(x, block, j):
    """3x3 split conv j of `block`: plain, or DCNv2 with offsets and sigmoid mask from its offset conv."""
    conv, s = block.conv2[j], block.stride
    if not block.deform:
        return F.relu(ref_norm(F.conv2d(x, conv.weight, None, s, 1), conv))
    om = F.conv2d(x, block.conv2_offset[j].weight, block.conv2_offset[j].bias, s, 1)
    o1, o2, mask = om[:, :9], om[:, 9:18], om[:, 18:]
    y = deform_conv2d(
        x, torch.cat([o1, o2], 1), conv.weight, None, (s, s), (1, 1), mask=torch.sigmoid(mask)
    )
    return F.relu(ref_norm(y, conv))


def ref_block(x, block, first_in_stage, chain=None):
    """The block's output; `chain`: whether split j adds conv j - 1's output (default: not first)."""
    chain = not first_in_stage if chain is None else chain
    w, scales = block.width, block.scales
    out = F.relu(ref_conv(x, block.conv1))
    splits = [out[:, j * w : (j + 1) * w] for j in range(scales)]
    ys = []
    for j in range(scales - 1):
        inp = ys[-1] + splits[j] if (j > 0 and chain) else splits[j]
        ys.append(ref_split_conv(inp, block, j))
    last = splits[-1]
    if first_in_stage and block.stride > 1:
        last = ref_avg_pool(last, 3, block.stride, 1, count_padding=True)
    out = ref_conv(torch.cat(ys + [last], 1), block.conv3)
    if block.shortcut is None:
        shortcut = x
    else:
        pooled = (
            x
            if block.stride == 1
            else ref_avg_pool(x, block.stride, block.stride, 0, count_padding=False)
        )
        shortcut = ref_conv(pooled, block.shortcut)
    return F.relu(out + shortcut)


# ------------------------------------------------------------------------------ the blocks
@pytest.mark.parametrize("deform", [False, True])
@pytest.mark.parametrize(
    "in_channels, out_channels, width, stride, first, size",
    [
        (64, 256, 26, 1, True, (13, 11)),  # res2's first block: shortcut without pooling
        (256, 512, 52, 2, True, (13, 11)),  # odd sizes: ceil-mode pooling of a partial window
        (512, 512, 52, 1, False, (7, 9)),  # a later block: chained splits, identity shortcut
    ],
)
def test_bottle2neck_matches_the_formula(
    in_channels, out_channels, width, stride, first, size, deform
):
    block = randomize_(Bottle2neckBlock(
        in_channels, out_channels, width=width, stride=stride, first_in_stage=first, norm="FrozenBN",
        deform=deform, deform_modulated=True,
    ))  # fmt: skip
    x = torch.randn(2, in_channels, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got, want = block(x), ref_block(x, block, first)
    assert got.shape == (2, out_channels, -(-size[0] // stride), -(-size[1] // stride))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    if first and stride == 1:  # the wiring matters: chained splits (the "normal" block's) differ
        assert (ref_block(x, block, first, chain=True) - want).abs().max() > 1e-2


def test_res4_first_block_at_the_size_of_800x1333():
    """res4's first block on res3's output of an 800x1333 image (100x167): the last column is a
    partial window of the stride-2 shortcut pool (its padding not counted)."""
    block = randomize_(
        Bottle2neckBlock(512, 1024, width=104, stride=2, first_in_stage=True, norm="FrozenBN")
    )
    x = torch.randn(1, 512, 100, 167, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = block(x), ref_block(x, block, True)
    assert got.shape == (1, 1024, 50, 84)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_stem_matches_the_formula():
    stem = randomize_(Res2NetStem(3, 64, norm="FrozenBN"))
    x = torch.randn(1, 3, 37, 50, generator=torch.Generator().manual_seed(3))
    want = F.relu(ref_conv(x, stem.conv1, stride=2, padding=1))
    want = F.relu(ref_conv(want, stem.conv2, padding=1))
    want = F.relu(ref_conv(want, stem.conv3, padding=1))
    want = F.max_pool2d(want, 3, 2, 1)
    assert [stem.conv1.weight.shape[0], stem.conv2.weight.shape[0], stem.conv3.weight.shape[0]] == [
        32,
        32,
        64,
    ]
    with torch.no_grad():
        torch.testing.assert_close(stem(x), want, rtol=1e-5, atol=1e-5)
    assert stem(x).shape == (1, 64, 10, 13)


# ------------------------------------------------------------------------------ the builder
def test_builder_structure_and_freezing():
    cfg = small_cfg(
        "MODEL.RESNETS.DEPTH", "101", "MODEL.RESNETS.NORM", "FrozenBN", "MODEL.BACKBONE.FREEZE_AT", "2",
        "MODEL.RESNETS.OUT_FEATURES", "['res2', 'res3', 'res4', 'res5']",
        "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]", "MODEL.RESNETS.DEFORM_MODULATED", "True",
    )  # fmt: skip
    net = build_res2net_backbone(cfg, ShapeSpec(channels=3))
    shapes = net.output_shape()
    assert [(shapes[f].channels, shapes[f].stride) for f in ("res2", "res3", "res4", "res5")] == [
        (256, 4),
        (512, 8),
        (1024, 16),
        (2048, 32),
    ]
    assert [len(getattr(net, f"res{i}")) for i in range(2, 6)] == [3, 4, 23, 3]
    # 26w x 4s: split widths 26, 52, 104, 208; three 3x3 convs per block; DCNv2 in res3-res5
    for i, width in zip(range(2, 6), (26, 52, 104, 208)):
        stage = getattr(net, f"res{i}")
        assert [b.first_in_stage for b in stage] == [True] + [False] * (len(stage) - 1)
        assert all(b.width == width and len(b.conv2) == 3 and b.deform == (i > 2) for b in stage)
        assert stage[0].stride == (1 if i == 2 else 2) and all(b.stride == 1 for b in stage[1:])
        assert torch.nn.modules.utils._pair(stage[0].conv2[0].stride) == (stage[0].stride,) * 2
    assert net.res3[0].conv2_offset[0].weight.shape == (27, 52, 3, 3)
    # FREEZE_AT 2: stem and res2 frozen, the rest trains (FrozenBN everywhere)
    frozen = {n.split(".")[0] for n, p in net.named_parameters() if not p.requires_grad}
    assert frozen == {"stem", "res2"}
    assert all(
        isinstance(m.norm, FrozenBatchNorm2d)
        for m in net.modules()
        if hasattr(m, "norm") and m.norm
    )


def test_builder_refuses_bad_keys():
    with pytest.raises(ValueError, match="MODEL.RESNETS.DEPTH 18"):
        build_res2net_backbone(small_cfg(), ShapeSpec(channels=3))
    with pytest.raises(ValueError, match="MODEL.RES2NET.SCALES >= 2"):
        build_res2net_backbone(
            small_cfg("MODEL.RESNETS.DEPTH", "50", "MODEL.RES2NET.SCALES", "1"),
            ShapeSpec(channels=3),
        )


# ------------------------------------------------------------------------------ a whole VFNet
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_shapes(tmp_path_factory.mktemp("tiny"), 4, 2)


def train_net(root, output_dir, *args):
    return run_train_net(
        root, output_dir, *args, *R2,
        "DATASETS.TRAIN", "('tiny_train',)", "DATASETS.TEST", "('tiny_val',)",
        "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "1",
        "SOLVER.STEPS", "(1,)", "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "96", "TEST.GALLERY.NUM_IMAGES", "0",
        "SEED", "7", threads=1, timeout=600,
    )  # fmt: skip


DCN = ["MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]", "MODEL.RESNETS.DEFORM_MODULATED", "True",
       "MODEL.VFNET.DCN_ON_LAST_CONV", "True"]  # fmt: skip


@pytest.mark.parametrize("deform", [False, True], ids=["R2", "R2-DCN"])
def test_res2net50_vfnet_trains_and_evaluates(tiny, tmp_path, deform):
    """The R2-101 and R2-101-DCN families (at depth 50): train_net, then --eval-only."""
    dcn = DCN if deform else []
    log = train_net(tiny, tmp_path, "SOLVER.MAX_ITER", "2", *dcn)
    ckpt = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert ckpt["iteration"] == 1
    assert "backbone.bottom_up.res3.0.conv2.2.weight" in ckpt["model"]
    assert ("backbone.bottom_up.res3.0.conv2_offset.2.weight" in ckpt["model"]) == deform
    assert "backbone.bottom_up.stem.conv3.weight" in ckpt["model"]
    lines = [line for line in open(tmp_path / "metrics.json")]
    assert len(lines) >= 1 and "total_loss" in lines[0]
    out = tmp_path / "eval"
    log = train_net(tiny, out, "--eval-only", "MODEL.WEIGHTS", str(tmp_path / "model_final.pth"), *dcn)
    assert "copypaste: AP" in log
    assert os.path.isfile(out / "inference" / "coco_instances_results.json")


@pytest.mark.parametrize("deform", [False, True])
def test_res2net50_vfnet_exports(tmp_path, deform):
    """TorchScript (plain) and ONNX (DCN: DeformConv in res3-res5): the exported model's detections
    are the eager model's."""
    from vfnet import export as E
    from helpers import assert_same_detections, eager_predictions, spread_scores

    opts = [*R2, "MODEL.VFNET.TEST_SCORE_THRESH", "0.6", "MODEL.VFNET.DEFORM_CONV_IMPL", "sampling",
            "INPUT.MIN_SIZE_TEST", "128", "INPUT.MAX_SIZE_TEST", "192"]  # fmt: skip
    if deform:
        opts += [
            "MODEL.RESNETS.DEFORM_ON_PER_STAGE",
            "[False, True, True, True]",
            "MODEL.RESNETS.DEFORM_MODULATED",
            "True",
        ]
    torch.manual_seed(0)
    model = spread_scores(build_model(small_cfg(*opts))).eval()
    rng = np.random.RandomState(0)
    sample, image = (rng.randint(0, 256, s, dtype=np.uint8) for s in ((120, 180, 3), (150, 110, 3)))
    sample[20:70, 30:90] = image[20:70, 30:80] = (40, 180, 220)
    x = E.resize_for_test(sample, 128, 192)
    if deform:
        pytest.importorskip("onnx", reason="onnx is not installed")
        pytest.importorskip("onnxruntime", reason="onnxruntime is not installed")
        import onnx

        path = str(tmp_path / "model.onnx")
        assert E.export_onnx(model, x, path) == 19
        ops = [n.op_type for n in onnx.load(path).graph.node]
        assert ops.count("DeformConv") == 3 * (
            4 + 6 + 3
        )  # three split convs per block of res3-res5
    else:
        path = str(tmp_path / "model.ts")
        E.export_torchscript(model, x, path)
    predictor = E.ExportedPredictor(path, min_size_test=128, max_size_test=192)
    assert_same_detections(eager_predictions(model, image), predictor(image)["instances"])
