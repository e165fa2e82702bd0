"""
The converter's Res2Net rules (vfnet/checkpoint/converter.py: RES2NET_RULES, the inverse
d2_to_mmdet, convert_imagenet_backbone, tools/convert_mmdet_to_d2.py --imagenet). Runs without
MMDetection: MMDetection-style state dicts are built from this project's R2-101 models with the
inverse mapping; the key names are pinned by a hand-written table and by the key counts of
MMDetection 3.3.0's own Res2Net VFNets (tests/parity/test_mmdet_parity_res2net.py checks the inverse
against them where MMDetection is installed).
"""

import os
import subprocess
import sys

import pytest
import torch

from vfnet.checkpoint.converter import RES2NET_RULES, RULES, ConversionError, convert_checkpoint_file, convert_imagenet_backbone, convert_key, convert_mmdet_to_d2, describe_mmdet_state_dict  # noqa: E501

from helpers import ROOT as REPO, mmdet_style as _mmdet_style, random_d2_state_dict as _d2_state_dict

TOOL = os.path.join(REPO, "tools", "convert_mmdet_to_d2.py")
CONFIGS = {
    "r2_101": "configs/mmdet/VFNet_R2_101_FPN_MS_2x.yaml",
    "r2_101_dcn": "configs/mmdet/VFNet_R2_101_DCN_FPN_MS_2x.yaml",
}
TRAIN_CONFIG = os.path.join(REPO, "configs", "VFNet_R2_101_FPN_MS_2x.yaml")
# len(model.state_dict()) of MMDetection 3.3.0's VFNets of configs/vfnet/vfnet_res2net-101_fpn_ms-2x_coco.py
# and vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py (80 classes); 172 BN counters each; the
# backbone alone (what an ImageNet checkpoint holds, without "backbone."): 1032 and 1212 keys.
MMDET_KEY_COUNTS = {"r2_101": 1087, "r2_101_dcn": 1271}
MMDET_BACKBONE_KEY_COUNTS = {"r2_101": 1032, "r2_101_dcn": 1212}
NUM_BN = 172

# MMDetection key -> Detectron2 key, written by hand from the two code bases.
GOLDEN = {
    "backbone.stem.0.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.stem.1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.stem.3.weight": "backbone.bottom_up.stem.conv2.weight",
    "backbone.stem.4.bias": "backbone.bottom_up.stem.conv2.norm.bias",
    "backbone.stem.6.weight": "backbone.bottom_up.stem.conv3.weight",
    "backbone.stem.7.weight": "backbone.bottom_up.stem.conv3.norm.weight",
    "backbone.layer1.0.conv1.weight": "backbone.bottom_up.res2.0.conv1.weight",
    "backbone.layer1.0.bn1.running_mean": "backbone.bottom_up.res2.0.conv1.norm.running_mean",
    "backbone.layer3.22.conv3.weight": "backbone.bottom_up.res4.22.conv3.weight",
    "backbone.layer4.2.bn3.bias": "backbone.bottom_up.res5.2.conv3.norm.bias",
    "backbone.layer2.1.convs.0.weight": "backbone.bottom_up.res3.1.conv2.0.weight",
    "backbone.layer2.1.bns.2.weight": "backbone.bottom_up.res3.1.conv2.2.norm.weight",
    "backbone.layer4.0.convs.1.conv_offset.bias": "backbone.bottom_up.res5.0.conv2_offset.1.bias",
    "backbone.layer1.0.downsample.1.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer2.0.downsample.2.running_var": "backbone.bottom_up.res3.0.shortcut.norm.running_var",
    "neck.fpn_convs.3.conv.weight": "backbone.top_block.p6.weight",
    "bbox_head.vfnet_cls.weight": "head.cls_score.weight",
}


def test_golden_keys():
    for mm, d2 in GOLDEN.items():
        assert convert_key(mm, rules=RES2NET_RULES)[1] == d2, mm
    # The one name both backbones have with another meaning: a BN weight in ResNet's shortcut.
    assert convert_key("backbone.layer1.0.downsample.1.weight", rules=RULES)[1] == (
        "backbone.bottom_up.res2.0.shortcut.norm.weight"
    )
    for k in (
        "backbone.stem.4.num_batches_tracked",
        "backbone.layer3.5.bns.1.num_batches_tracked",
        "backbone.layer1.0.downsample.2.num_batches_tracked",
        # the unused plain conv2 of the official code with `delattr(self, 'conv2')` commented out
        "backbone.layer2.0.conv2.weight",
        "backbone.layer2.0.conv2.conv_offset.weight",
    ):
        assert convert_key(k, rules=RES2NET_RULES)[1] is None, k
    for k in (
        "backbone.stem.2.weight",  # the ReLU has no tensor
        "backbone.layer1.0.bn2.weight",  # Res2Net deletes norm2
        "backbone.layer1.0.downsample.0.weight",  # the average pool has no tensor
        "backbone.layer1.0.downsample.1.bias",
        "backbone.conv1.weight",
        "backbone.fc.weight",  # only convert_imagenet_backbone drops the classifier
    ):
        assert convert_key(k, rules=RES2NET_RULES) is None, k


# --------------------------------------------------------------------------- fake checkpoints


@pytest.fixture(scope="module", params=list(CONFIGS))
def fake(request):
    d2_sd, cfg = _d2_state_dict(CONFIGS[request.param], num_classes=80)
    return request.param, d2_sd, _mmdet_style(d2_sd), cfg


def test_fake_checkpoint_has_mmdet_key_set(fake):
    variant, _, mm, _ = fake
    assert len(mm) == MMDET_KEY_COUNTS[variant]
    assert sum(k.endswith("num_batches_tracked") for k in mm) == NUM_BN
    assert sum(k.startswith("backbone.") for k in mm) == MMDET_BACKBONE_KEY_COUNTS[variant]
    assert set(GOLDEN) - set(mm) <= {"backbone.layer4.0.convs.1.conv_offset.bias"}


def test_every_key_maps_and_values_move_unchanged(fake):
    variant, d2_sd, mm, _ = fake
    converted, report = convert_mmdet_to_d2(mm)
    assert set(converted) == set(d2_sd)
    assert len(report["dropped"]) == NUM_BN
    for k, v in converted.items():
        assert torch.equal(v, d2_sd[k]), k
    for mm_key, d2_key in GOLDEN.items():
        if mm_key in mm:
            assert converted[d2_key] is mm[mm_key]


def test_describe(fake):
    variant, _, mm, _ = fake
    info = describe_mmdet_state_dict(mm)
    assert (info["backbone"], info["depth"], info["blocks_per_stage"]) == (
        "Res2Net",
        101,
        (3, 4, 23, 3),
    )
    assert (info["scales"], info["base_width"]) == (4, 26)
    dcn = variant == "r2_101_dcn"
    assert info["deform_stages"] == (["res3", "res4", "res5"] if dcn else [])
    assert info["dcn_on_last_conv"] is dcn and info["num_classes"] == 80


def _load_with_checkpointer(cfg, path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    ckpt = DetectionCheckpointer(model)
    seen = {}
    load_model = ckpt._load_model

    def capture(checkpoint):
        seen["incompatible"] = load_model(checkpoint)
        return seen["incompatible"]

    ckpt._load_model = capture
    ckpt.load(path)
    return model, seen["incompatible"]


def test_tool_output_loads_with_detection_checkpointer(fake, tmp_path):
    """With the unused conv2 tensors of the official README's inference note: dropped, counted."""
    variant, d2_sd, mm, cfg = fake
    mm = dict(mm)
    extra = {"backbone.layer2.0.conv2.weight": torch.zeros(52, 52, 3, 3)}
    if variant == "r2_101_dcn":
        extra["backbone.layer2.0.conv2.conv_offset.weight"] = torch.zeros(27, 52, 3, 3)
        extra["backbone.layer2.0.conv2.conv_offset.bias"] = torch.zeros(27)
    mm.update(extra)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"meta": {"mmdet_version": "2.10.0"}, "state_dict": mm}, src)
    summary = convert_checkpoint_file(str(src), str(dst), os.path.join(REPO, CONFIGS[variant]))
    assert f"{NUM_BN} num_batches_tracked dropped, {len(extra)} unused tensors dropped" in summary
    assert "Res2Net101 blocks (3, 4, 23, 3) 26w x 4s" in summary
    model, inc = _load_with_checkpointer(cfg, str(dst))
    assert (inc.missing_keys, inc.unexpected_keys, inc.incorrect_shapes) == ([], [], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, d2_sd[k]), k


def test_refuses_unknown_res2net_key(fake):
    _, _, mm, _ = fake
    for key in ("backbone.layer1.0.bn2.weight", "backbone.layer1.0.convs.0.bias"):
        sd = dict(mm, **{key: torch.zeros(1)})
        with pytest.raises(ConversionError, match="match no conversion rule") as e:
            convert_mmdet_to_d2(sd)
        assert f"'{key}'" in str(e.value) and "Res2Net" in str(e.value)


# --------------------------------------------------------------------------- ImageNet weights
def _imagenet_style(mm):
    """An ImageNet Res2Net checkpoint: the backbone's keys without "backbone.", a classifier."""
    sd = {k[len("backbone.") :]: v for k, v in mm.items() if k.startswith("backbone.")}
    sd["fc.weight"], sd["fc.bias"] = torch.randn(1000, 2048), torch.randn(1000)
    return sd


def test_imagenet_tool_output_initialises_the_training_config(fake, tmp_path):
    variant, d2_sd, mm, _ = fake
    if variant != "r2_101":
        pytest.skip("one ImageNet checkpoint (the DCN config reads the same file)")
    src, dst = tmp_path / "res2net101_v1d_26w_4s.pth", tmp_path / "d2.pth"
    torch.save({"state_dict": _imagenet_style(mm)}, src)
    out = subprocess.run(
        [sys.executable, TOOL, "--imagenet", str(src), str(dst), "--config-file", TRAIN_CONFIG],
        capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{NUM_BN} num_batches_tracked dropped, 2 unused tensors dropped" in out.stdout
    assert "ImageNet backbone only" in out.stdout and "every key and shape matches" in out.stdout
    saved = torch.load(dst, weights_only=True)["model"]
    bottom_up = {k: v for k, v in d2_sd.items() if k.startswith("backbone.bottom_up.")}
    assert set(saved) == set(bottom_up)
    assert all(torch.equal(saved[k], v) for k, v in bottom_up.items())
    # The training config (BN with NORM_EVAL, FREEZE_AT 2), its MODEL.WEIGHTS pointing at the output.
    import vfnet
    from detectron2.config import get_cfg

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(TRAIN_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    model, inc = _load_with_checkpointer(cfg, str(dst))
    assert inc.unexpected_keys == [] and inc.incorrect_shapes == []
    # (the BatchNorm step counters of the training config's BN are not in the checkpoint)
    assert inc.missing_keys and not any(
        k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")
        for k in inc.missing_keys
    )
    for k, v in model.state_dict().items():
        if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked"):
            assert torch.equal(v, d2_sd[k]), k


def test_imagenet_refusals(fake):
    _, _, mm, _ = fake
    with pytest.raises(ConversionError, match="detector's.*without --imagenet"):
        convert_imagenet_backbone(mm)
    # Neither a ResNet (no layer1.0.conv1) nor a Res2Net (no layer1.0.convs.0).
    partial = {"conv1.weight": torch.zeros(1), "layer1.0.conv2.weight": torch.zeros(1)}
    with pytest.raises(ConversionError, match="Not an ImageNet ResNet, ResNeXt or Res2Net.*layer1.0.convs.0.weight"):
        convert_imagenet_backbone(partial)
    sd = dict(_imagenet_style(mm), **{"layer1.0.se.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match="match no Res2Net rule.*'layer1.0.se.weight'"):
        convert_imagenet_backbone(sd)
