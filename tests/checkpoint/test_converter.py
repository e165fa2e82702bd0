"""
The MMDetection -> Detectron2 VFNet checkpoint converter (vfnet/checkpoint/converter.py: the
key mapping, and the checkpoint files tools/convert_mmdet_to_d2.py converts with it) and the
tool. Runs without MMDetection: MMDetection-style state dicts are built from a Detectron2
model's state dict with the inverse mapping, plus the keys only MMDetection has
(num_batches_tracked); the key names are pinned by a hand-written table and by the key counts
of MMDetection 3.3.0's own VFNet models.
"""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from vfnet.checkpoint.converter import ConversionError, convert_checkpoint_file, convert_key, convert_mmdet_to_d2, describe_mmdet_state_dict, extract_state_dict  # noqa: E501

from helpers import ROOT as REPO, mmdet_style as _mmdet_style, random_d2_state_dict as _d2_state_dict

TOOL = os.path.join(REPO, "tools", "convert_mmdet_to_d2.py")

# MMDetection key -> Detectron2 key, written by hand from the two code bases.
GOLDEN = {
    "backbone.conv1.weight": "backbone.bottom_up.stem.conv1.weight",
    "backbone.bn1.running_var": "backbone.bottom_up.stem.conv1.norm.running_var",
    "backbone.layer1.0.conv1.weight": "backbone.bottom_up.res2.0.conv1.weight",
    "backbone.layer1.0.bn3.bias": "backbone.bottom_up.res2.0.conv3.norm.bias",
    "backbone.layer1.0.downsample.0.weight": "backbone.bottom_up.res2.0.shortcut.weight",
    "backbone.layer1.0.downsample.1.running_mean": "backbone.bottom_up.res2.0.shortcut.norm.running_mean",
    "backbone.layer3.22.bn2.weight": "backbone.bottom_up.res4.22.conv2.norm.weight",
    "backbone.layer4.2.conv3.weight": "backbone.bottom_up.res5.2.conv3.weight",
    "backbone.layer2.0.conv2.conv_offset.weight": "backbone.bottom_up.res3.0.conv2_offset.weight",
    "backbone.layer4.1.conv2.conv_offset.bias": "backbone.bottom_up.res5.1.conv2_offset.bias",
    "neck.lateral_convs.0.conv.weight": "backbone.fpn_lateral3.weight",
    "neck.lateral_convs.2.conv.bias": "backbone.fpn_lateral5.bias",
    "neck.fpn_convs.1.conv.weight": "backbone.fpn_output4.weight",
    "neck.fpn_convs.3.conv.weight": "backbone.top_block.p6.weight",
    "neck.fpn_convs.4.conv.bias": "backbone.top_block.p7.bias",
    "bbox_head.cls_convs.0.conv.weight": "head.cls_tower.0.weight",
    "bbox_head.cls_convs.1.gn.bias": "head.cls_tower.1.norm.bias",
    "bbox_head.reg_convs.2.gn.weight": "head.reg_tower.2.norm.weight",
    "bbox_head.vfnet_reg_conv.conv.weight": "head.reg_init_conv.weight",
    "bbox_head.vfnet_reg_conv.gn.weight": "head.reg_init_conv.norm.weight",
    "bbox_head.vfnet_reg.bias": "head.reg_init.bias",
    "bbox_head.vfnet_reg_refine_dconv.weight": "head.reg_refine_conv.weight",
    "bbox_head.vfnet_reg_refine.weight": "head.reg_refine.weight",
    "bbox_head.vfnet_cls_dconv.weight": "head.cls_conv.weight",
    "bbox_head.vfnet_cls.weight": "head.cls_score.weight",
    "bbox_head.vfnet_cls.bias": "head.cls_score.bias",
}
GOLDEN_DCN_TOWER = {
    "bbox_head.cls_convs.2.conv.weight": "head.cls_tower.2.conv.weight",
    "bbox_head.cls_convs.2.conv.conv_offset.weight": "head.cls_tower.2.conv_offset.weight",
    "bbox_head.reg_convs.2.conv.conv_offset.bias": "head.reg_tower.2.conv_offset.bias",
    "bbox_head.reg_convs.2.gn.bias": "head.reg_tower.2.norm.bias",
}
# len(model.state_dict()) of MMDetection 3.3.0's VFNet built from configs/vfnet/*.py (80 classes).
MMDET_KEY_COUNTS = {"r50": 373, "r50_dcn": 403}


def test_golden_keys():
    for mm, d2 in GOLDEN.items():
        assert convert_key(mm) == (convert_key(mm)[0], d2), mm
    towers = {("cls", "2"), ("reg", "2")}
    for mm, d2 in GOLDEN_DCN_TOWER.items():
        assert convert_key(mm, towers)[1] == d2, mm
    assert convert_key("bbox_head.scales.3.scale")[1] == ("head.scales", 3)
    assert convert_key("bbox_head.scales_refine.0.scale")[1] == ("head.scales_refine", 0)
    for k in (
        "backbone.bn1.num_batches_tracked",
        "backbone.layer3.4.bn2.num_batches_tracked",
        "backbone.layer1.0.downsample.1.num_batches_tracked",
    ):
        assert convert_key(k)[1] is None, k
    for k in (
        "backbone.layer5.0.conv1.weight",
        "neck.fpn_convs.5.conv.weight",
        "bbox_head.vfnet_cls.scale",
        "backbone.layer1.0.conv4.weight",
        "neck.lateral_convs.3.conv.weight",
        "backbone.fc.weight",
    ):
        assert convert_key(k) is None, k


# --------------------------------------------------------------------------- fake checkpoints


CONFIGS = {
    "r50": "configs/mmdet/VFNet_R_50_FPN_1x.yaml",
    "r50_dcn": "configs/mmdet/VFNet_R_50_DCN_FPN_MS_2x.yaml",
}


@pytest.fixture(scope="module", params=list(CONFIGS))
def fake(request):
    d2_sd, cfg = _d2_state_dict(CONFIGS[request.param], num_classes=80)
    return request.param, d2_sd, _mmdet_style(d2_sd), cfg


def test_fake_checkpoint_has_mmdet_key_set(fake):
    variant, _, mm, _ = fake
    assert len(mm) == MMDET_KEY_COUNTS[variant]
    assert sum(k.endswith("num_batches_tracked") for k in mm) == 53
    assert all(k.startswith(("backbone.", "neck.", "bbox_head.")) for k in mm)
    assert sum(k.startswith("bbox_head.scales.") for k in mm) == 5
    assert all(mm[k].dim() == 0 for k in mm if k.endswith(".scale"))


def test_every_key_maps_and_values_move_unchanged(fake):
    variant, d2_sd, mm, _ = fake
    converted, report = convert_mmdet_to_d2(mm)
    assert set(converted) == set(d2_sd)
    assert len(report["dropped"]) == 53 and all(
        k.endswith("num_batches_tracked") for k in report["dropped"]
    )
    assert sorted(report["stacked"]) == sorted(k for k in mm if k.endswith(".scale"))
    for k, v in converted.items():
        assert v.shape == d2_sd[k].shape and v.dtype == d2_sd[k].dtype, k
        assert torch.equal(v, d2_sd[k]), k
    # plain renames move the very tensors; the scales are stacked in level order
    assert converted["head.cls_score.weight"] is mm["bbox_head.vfnet_cls.weight"]
    for i in range(5):
        assert converted["head.scales"][i] == mm[f"bbox_head.scales.{i}.scale"]
        assert converted["head.scales_refine"][i] == mm[f"bbox_head.scales_refine.{i}.scale"]
    for mm_key, d2_key in GOLDEN.items():
        if mm_key in mm:
            assert converted[d2_key] is mm[mm_key]


def test_describe(fake):
    variant, _, mm, _ = fake
    info = describe_mmdet_state_dict(mm)
    assert info["depth"] == 50 and info["num_groups"] == 1 and info["num_classes"] == 80
    assert info["num_levels"] == 5 and info["num_convs"] == 3 and info["head_norm"] == "GN"
    dcn = variant == "r50_dcn"
    assert info["deform_stages"] == (["res3", "res4", "res5"] if dcn else [])
    assert info["dcn_on_last_conv"] is dcn


# --------------------------------------------------------------------------- refusals
def _tiny_vfnet():
    t = torch.zeros(1)
    return {
        "backbone.conv1.weight": t,
        "bbox_head.vfnet_cls.weight": torch.zeros(3, 8, 3, 3),
        "bbox_head.vfnet_cls.bias": torch.zeros(3),
        "bbox_head.scales.0.scale": torch.tensor(1.0),
        "bbox_head.scales.1.scale": torch.tensor(1.0),
    }


def test_refuses_non_vfnet():
    sd = {"backbone.conv1.weight": torch.zeros(1), "bbox_head.retina_cls.weight": torch.zeros(1)}
    with pytest.raises(
        ConversionError, match=r"Not a VarifocalNet.*bbox_head\.vfnet_cls\.weight.*retina_cls"
    ):
        convert_mmdet_to_d2(sd)


@pytest.mark.parametrize(
    "key",
    [
        "bbox_head.vfnet_cls.extra",
        "neck.fpn_convs.5.conv.weight",
        "backbone.layer5.0.conv1.weight",
        "module.backbone.conv1.weight",
        "data_preprocessor.mean",
    ],
)
def test_refuses_unknown_key(key):
    sd = _tiny_vfnet()
    sd[key] = torch.zeros(1)
    with pytest.raises(ConversionError, match="match no conversion rule") as e:
        convert_mmdet_to_d2(sd)
    assert f"'{key}'" in str(e.value)


def test_refuses_bad_scales():
    sd = _tiny_vfnet()
    del sd["bbox_head.scales.0.scale"]
    sd["bbox_head.scales.2.scale"] = torch.tensor(1.0)
    with pytest.raises(ConversionError, match=r"head\.scales.*numbered \[1, 2\]"):
        convert_mmdet_to_d2(sd)
    sd = _tiny_vfnet()
    sd["bbox_head.scales.1.scale"] = torch.ones(2)
    with pytest.raises(ConversionError, match=r"'bbox_head\.scales\.1\.scale' has shape \(2,\)"):
        convert_mmdet_to_d2(sd)


def test_extract_state_dict():
    sd = _tiny_vfnet()
    assert extract_state_dict({"meta": {"epoch": 12}, "state_dict": sd, "optimizer": {}}) == sd
    assert extract_state_dict(sd) == sd
    with pytest.raises(ConversionError, match="already a Detectron2 checkpoint"):
        extract_state_dict({"model": sd, "__author__": "x"})
    with pytest.raises(ConversionError, match="key 'meta'"):
        extract_state_dict({"meta": {}, **sd})


# --------------------------------------------- checkpoint files (convert_checkpoint_file), the tool
def _save_mmdet_checkpoint(path, mm_sd):
    meta = {
        "mmdet_version": "2.6.0",
        "CLASSES": ("person", "bicycle"),
        "epoch": 12,
        "seed": np.int64(7),
        "config": "model = dict(type='VFNet')",
        "time": "Tue Oct 27 2020",
    }
    torch.save({"meta": meta, "state_dict": mm_sd}, path)


def _load_with_checkpointer(cfg, path):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    model = build_model(cfg)
    ckpt = DetectionCheckpointer(model)
    seen = {}
    load_model = ckpt._load_model

    def capture(checkpoint):
        seen["heuristics"] = checkpoint.get("matching_heuristics")
        seen["incompatible"] = load_model(checkpoint)
        return seen["incompatible"]

    ckpt._load_model = capture
    ckpt.load(path)
    return model, seen


def _files(folder):
    return sorted(os.listdir(folder))


def test_tool_output_loads_with_detection_checkpointer(fake, tmp_path):
    variant, d2_sd, mm, cfg = fake
    src, dst = tmp_path / "mmdet.pth", tmp_path / "out" / "d2.pth"
    _save_mmdet_checkpoint(src, mm)
    convert_checkpoint_file(str(src), str(dst), os.path.join(REPO, CONFIGS[variant]))
    assert _files(dst.parent) == ["d2.pth"]
    saved = torch.load(dst, weights_only=True)
    assert saved["__author__"] == "mmdetection" and saved["matching_heuristics"] is False
    model, seen = _load_with_checkpointer(cfg, str(dst))
    assert seen["heuristics"] is False
    inc = seen["incompatible"]
    assert (inc.missing_keys, inc.unexpected_keys, inc.incorrect_shapes) == ([], [], [])
    for k, v in model.state_dict().items():
        assert torch.equal(v, d2_sd[k]), k


def test_tool_cli_bare_state_dict_and_overrides(tmp_path):
    d2_sd, _ = _d2_state_dict(CONFIGS["r50"], num_classes=3)
    src, dst = tmp_path / "bare.pth", tmp_path / "d2.pth"
    torch.save(_mmdet_style(d2_sd), src)  # a bare state dict, no "state_dict"/"meta"
    out = subprocess.run(
        [
            sys.executable,
            TOOL,
            str(src),
            str(dst),
            "--config-file",
            os.path.join(REPO, CONFIGS["r50"]),
            "MODEL.VFNET.NUM_CLASSES",
            "3",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "312" in out and "53 num_batches_tracked dropped" in out and "3 classes" in out
    assert "every key and shape matches" in out
    assert _files(tmp_path) == ["bare.pth", "d2.pth"]


def test_tool_reports_all_shape_problems_and_writes_nothing(tmp_path):
    d2_sd, _ = _d2_state_dict(CONFIGS["r50"], num_classes=3)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    _save_mmdet_checkpoint(src, _mmdet_style(d2_sd))
    with pytest.raises(ConversionError) as e:  # config has 80 classes, the checkpoint 3
        convert_checkpoint_file(str(src), str(dst), os.path.join(REPO, CONFIGS["r50"]))
    msg = str(e.value)
    assert "2 problem(s)" in msg and "nothing written" in msg
    assert "head.cls_score.weight checkpoint (3, 256, 3, 3) vs model (80, 256, 3, 3)" in msg
    assert "head.cls_score.bias checkpoint (3,) vs model (80,)" in msg
    assert _files(tmp_path) == ["mmdet.pth"]


def test_tool_reports_architecture_mismatch(tmp_path):
    d2_sd, _ = _d2_state_dict(CONFIGS["r50"], num_classes=80)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    _save_mmdet_checkpoint(src, _mmdet_style(d2_sd))
    with pytest.raises(ConversionError) as e:
        convert_checkpoint_file(str(src), str(dst), os.path.join(REPO, CONFIGS["r50_dcn"]))
    msg = str(e.value)
    assert "missing in checkpoint: backbone.bottom_up.res3.0.conv2_offset.weight" in msg
    assert "missing in checkpoint: head.cls_tower.2.conv_offset.weight" in msg
    assert "not in the model: head.cls_tower.2.weight" in msg
    assert _files(tmp_path) == ["mmdet.pth"]


def test_tool_refuses_unknown_key_and_keeps_existing_output(tmp_path):
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    sd = _tiny_vfnet()
    sd["bbox_head.atss_centerness.weight"] = torch.zeros(1)
    _save_mmdet_checkpoint(src, sd)
    dst.write_bytes(b"previous")
    with pytest.raises(ConversionError, match="bbox_head.atss_centerness.weight"):
        convert_checkpoint_file(str(src), str(dst))
    assert dst.read_bytes() == b"previous"
    assert _files(tmp_path) == ["d2.pth", "mmdet.pth"]


def test_tool_refuses_non_vfnet(tmp_path):
    src, dst = tmp_path / "retina.pth", tmp_path / "d2.pth"
    _save_mmdet_checkpoint(
        src,
        {"backbone.conv1.weight": torch.zeros(1), "bbox_head.retina_cls.weight": torch.zeros(1)},
    )
    # the tool's command line: the error on stderr, exit status 1
    out = subprocess.run([sys.executable, TOOL, str(src), str(dst)], capture_output=True, text=True)
    assert out.returncode == 1, out.stderr
    assert f"\nerror: {src}: Not a VarifocalNet checkpoint" in "\n" + out.stderr, out.stderr
    assert re.search(r"Not a VarifocalNet checkpoint.*bbox_head\.vfnet_cls\.weight", out.stderr)
    assert _files(tmp_path) == ["retina.pth"]


def test_tool_leaves_no_partial_file_when_writing_fails(tmp_path, monkeypatch):
    d2_sd, _ = _d2_state_dict(CONFIGS["r50"], num_classes=3)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    _save_mmdet_checkpoint(src, _mmdet_style(d2_sd))
    dst.write_bytes(b"previous")

    def failing_save(obj, f):
        f.write(b"partial data")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        convert_checkpoint_file(str(src), str(dst))
    assert dst.read_bytes() == b"previous"
    assert _files(tmp_path) == ["d2.pth", "mmdet.pth"]


class Opaque:
    """An object torch.load(weights_only=True) refuses to unpickle."""


def test_tool_refuses_unsafe_pickle_without_flag(tmp_path):
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"meta": {"hook": Opaque()}, "state_dict": _tiny_vfnet()}, src)
    with pytest.raises(ConversionError, match="allow-unsafe-pickle"):
        convert_checkpoint_file(str(src), str(dst))
    assert _files(tmp_path) == ["mmdet.pth"]
