"""
Convert the state dict of an MMDetection VarifocalNet (``VFNet`` detector: ResNet/ResNeXt
backbone, FPN neck, ``VFNetHead``) to the parameter names of this project's Detectron2 model.

The mapping is a table of explicit rules (:data:`RULES`), one per parameter family; each
MMDetection key must match exactly one rule or the conversion is refused. Values are moved
unchanged, except the per-level scalars of ``bbox_head.scales.i.scale`` and
``bbox_head.scales_refine.i.scale``, which are stacked into the one (L,) tensor of
``head.scales`` / ``head.scales_refine``. ``num_batches_tracked`` of the BatchNorm layers is
dropped (Detectron2's FrozenBatchNorm2d has none).

Conventions verified against MMDetection 3.3.0 (and valid for the 2.x checkpoints of the
official VarifocalNet release, which use the same names):

* ResNet ``layerN`` (N = 1..4) is Detectron2's ``res{N+1}``; ``bnK`` is ``convK.norm``;
  ``downsample.0/1`` is ``shortcut`` / ``shortcut.norm``; the stem ``conv1``/``bn1`` is
  ``stem.conv1`` / ``stem.conv1.norm``.
* The DCNv2 ``conv2.conv_offset`` (mmcv ``ModulatedDeformConv2dPack``: 27 channels chunked as
  offset-1, offset-2, mask) is Detectron2's ``conv2_offset`` with the same chunk order.
* FPN with ``start_level=1``: ``lateral_convs.i`` / ``fpn_convs.i`` (i = 0..2) are
  ``fpn_lateral{i+3}`` / ``fpn_output{i+3}``; the extra convs ``fpn_convs.3`` / ``fpn_convs.4``
  (P6 from the P5 output, P7 from ReLU(P6)) are ``top_block.p6`` / ``top_block.p7``.
* Head towers: ``cls_convs.i`` / ``reg_convs.i`` (mmcv ConvModule: ``.conv``, ``.gn``) are
  ``cls_tower.i`` / ``reg_tower.i`` (Detectron2 Conv2d with ``.norm``); a DCNv2 tower conv
  (``dcn_on_last_conv``, keys ``.conv.weight`` + ``.conv.conv_offset.*``) is this project's
  ``ModulatedDeformConvBlock`` (``.conv.weight``, ``.conv_offset.*``, ``.norm.*``).

Checkpoint files (what tools/convert_mmdet_to_d2.py runs): :func:`convert_checkpoint_file` reads
an MMDetection checkpoint with the safe loader (:func:`load_checkpoint`), converts it, optionally
checks it against a config's model (:func:`refuse_misfit`) and writes it atomically
(:func:`save_converted`).

This module imports only torch (no Detectron2, no MMDetection); :func:`check_against_model`
imports Detectron2 when it is called.
"""

import os
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..utils.file_io import atomic_write

__all__ = [
    "ConversionError",
    "RES2NET_RULES",
    "RULES",
    "VFNET_MARKER_KEY",
    "check_against_model",
    "convert_checkpoint_file",
    "convert_imagenet_backbone",
    "convert_mmdet_to_d2",
    "convert_key",
    "describe_mmdet_state_dict",
    "detectron2_checkpoint",
    "extract_state_dict",
    "is_res2net",
    "imagenet_backbone",
    "load_checkpoint",
    "conversion_summary",
    "misfit",
    "read_mmdet_checkpoint",
    "refuse_misfit",
    "save_converted",
]

# A checkpoint without this key has no VFNet head.
VFNET_MARKER_KEY = "bbox_head.vfnet_cls.weight"

_BN = r"(weight|bias|running_mean|running_var)"
_GN = r"(weight|bias)"
_WB = r"(weight|bias)"

# What a rule does with the matched key.
DROP = "drop"  # the tensor has no Detectron2 counterpart and carries no information
STACK = "stack"  # a per-level scalar, stacked with the other levels into one (L,) tensor


class ConversionError(ValueError):
    """The state dict cannot be converted; the message names the offending key(s)."""


def _res(m: "re.Match") -> str:
    # MMDetection's ResNet layerN (N = 1..4) is Detectron2's res{N+1}.
    return f"backbone.bottom_up.res{int(m.group(1)) + 1}.{m.group(2)}"


# (name, pattern, target). `pattern` must match the whole MMDetection key. `target` is a
# function of the match giving the Detectron2 key, (STACK, d2_key) for a per-level scalar
# (group 1 is the level), DROP, or "tower_conv": a tower conv (cls_convs.i / reg_convs.i),
# whose name depends on whether it is a DCNv2 conv (its `.conv.conv_offset.weight` is in the
# state dict), see convert_key.

_RESNET_BACKBONE: List[Tuple[str, "re.Pattern", object]] = [
    # ------------------------------------------------------------------ backbone: stem
    (
        "stem conv",
        re.compile(r"backbone\.conv1\.weight"),
        lambda m: "backbone.bottom_up.stem.conv1.weight",
    ),
    (
        "stem bn",
        re.compile(rf"backbone\.bn1\.{_BN}"),
        lambda m: f"backbone.bottom_up.stem.conv1.norm.{m.group(1)}",
    ),
    # ------------------------------------------------------------------ backbone: blocks
    (
        "block conv",
        re.compile(r"backbone\.layer([1-4])\.(\d+)\.conv([123])\.weight"),
        lambda m: f"{_res(m)}.conv{m.group(3)}.weight",
    ),
    (
        "block bn",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.bn([123])\.{_BN}"),
        lambda m: f"{_res(m)}.conv{m.group(3)}.norm.{m.group(4)}",
    ),
    (
        "block DCNv2 offset conv",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.conv2\.conv_offset\.{_WB}"),
        lambda m: f"{_res(m)}.conv2_offset.{m.group(3)}",
    ),
    (
        "shortcut conv",
        re.compile(r"backbone\.layer([1-4])\.(\d+)\.downsample\.0\.weight"),
        lambda m: f"{_res(m)}.shortcut.weight",
    ),
    (
        "shortcut bn",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.downsample\.1\.{_BN}"),
        lambda m: f"{_res(m)}.shortcut.norm.{m.group(3)}",
    ),
    (
        "bn counter",
        re.compile(
            r"backbone\.(bn1|layer[1-4]\.\d+\.(bn[123]|downsample\.1))\.num_batches_tracked"
        ),
        DROP,
    ),
]

# Res2Net v1d (mmdet's Res2Net: deep stem, Bottle2neck, average-pool shortcut), whose names partly
# coincide with ResNet's (``downsample.1.weight`` is a conv here, a BN there): a state dict takes
# these rules when it has ``convs`` keys (:func:`is_res2net`).
_RES2NET_BACKBONE: List[Tuple[str, "re.Pattern", object]] = [
    (
        "Res2Net stem conv",
        re.compile(r"backbone\.stem\.([036])\.weight"),
        lambda m: f"backbone.bottom_up.stem.conv{int(m.group(1)) // 3 + 1}.weight",
    ),
    (
        "Res2Net stem bn",
        re.compile(rf"backbone\.stem\.([147])\.{_BN}"),
        lambda m: f"backbone.bottom_up.stem.conv{int(m.group(1)) // 3 + 1}.norm.{m.group(2)}",
    ),
    (
        "Res2Net 1x1 conv",
        re.compile(r"backbone\.layer([1-4])\.(\d+)\.conv([13])\.weight"),
        lambda m: f"{_res(m)}.conv{m.group(3)}.weight",
    ),
    (
        "Res2Net 1x1 bn",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.bn([13])\.{_BN}"),
        lambda m: f"{_res(m)}.conv{m.group(3)}.norm.{m.group(4)}",
    ),
    (
        "Res2Net split conv",
        re.compile(r"backbone\.layer([1-4])\.(\d+)\.convs\.(\d+)\.weight"),
        lambda m: f"{_res(m)}.conv2.{m.group(3)}.weight",
    ),
    (
        "Res2Net split DCNv2 offset conv",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.convs\.(\d+)\.conv_offset\.{_WB}"),
        lambda m: f"{_res(m)}.conv2_offset.{m.group(3)}.{m.group(4)}",
    ),
    (
        "Res2Net split bn",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.bns\.(\d+)\.{_BN}"),
        lambda m: f"{_res(m)}.conv2.{m.group(3)}.norm.{m.group(4)}",
    ),
    (
        "Res2Net shortcut conv",  # downsample.0 is the average pool
        re.compile(r"backbone\.layer([1-4])\.(\d+)\.downsample\.1\.weight"),
        lambda m: f"{_res(m)}.shortcut.weight",
    ),
    (
        "Res2Net shortcut bn",
        re.compile(rf"backbone\.layer([1-4])\.(\d+)\.downsample\.2\.{_BN}"),
        lambda m: f"{_res(m)}.shortcut.norm.{m.group(3)}",
    ),
    (
        "Res2Net bn counter",
        re.compile(
            r"backbone\.(stem\.[147]|layer[1-4]\.\d+\.(bn[13]|bns\.\d+|downsample\.2))"
            r"\.num_batches_tracked"
        ),
        DROP,
    ),
    # The official VarifocalNet's README asks to comment out Bottle2neck's `delattr(self, 'conv2')`
    # for inference with DCN (mmdet 2.x's init_weights reads `conv2.conv_offset`): a checkpoint
    # saved so holds the plain ResNet conv2 that the Res2Net forward never uses.
    (
        "Res2Net unused conv2",
        re.compile(
            r"backbone\.layer([1-4])\.(\d+)\.conv2\.(weight|conv_offset\.weight|conv_offset\.bias)"
        ),
        DROP,
    ),
]

# The classifier of an ImageNet checkpoint (convert_imagenet_backbone), not part of a detector.
_IMAGENET_CLASSIFIER = [("classifier", re.compile(r"backbone\.fc\.(weight|bias)"), DROP)]

_NECK_AND_HEAD: List[Tuple[str, "re.Pattern", object]] = [
    # ------------------------------------------------------------------ neck (FPN, start_level=1)
    (
        "fpn lateral",
        re.compile(rf"neck\.lateral_convs\.([0-2])\.conv\.{_WB}"),
        lambda m: f"backbone.fpn_lateral{int(m.group(1)) + 3}.{m.group(2)}",
    ),
    (
        "fpn output",
        re.compile(rf"neck\.fpn_convs\.([0-2])\.conv\.{_WB}"),
        lambda m: f"backbone.fpn_output{int(m.group(1)) + 3}.{m.group(2)}",
    ),
    (
        "fpn P6",
        re.compile(rf"neck\.fpn_convs\.3\.conv\.{_WB}"),
        lambda m: f"backbone.top_block.p6.{m.group(1)}",
    ),
    (
        "fpn P7",
        re.compile(rf"neck\.fpn_convs\.4\.conv\.{_WB}"),
        lambda m: f"backbone.top_block.p7.{m.group(1)}",
    ),
    # ------------------------------------------------------------------ head: towers
    # (mapped by _tower_conv: plain conv -> tower.i.{weight,bias}, DCNv2 -> tower.i.conv.weight)
    ("tower conv", re.compile(rf"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.{_WB}"), "tower_conv"),
    (
        "tower DCNv2 offset conv",
        re.compile(rf"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.conv_offset\.{_WB}"),
        lambda m: f"head.{m.group(1)}_tower.{m.group(2)}.conv_offset.{m.group(3)}",
    ),
    (
        "tower gn",
        re.compile(rf"bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.{_GN}"),
        lambda m: f"head.{m.group(1)}_tower.{m.group(2)}.norm.{m.group(3)}",
    ),
    # ------------------------------------------------------------------ head: initial box
    (
        "reg init conv",
        re.compile(rf"bbox_head\.vfnet_reg_conv\.conv\.{_WB}"),
        lambda m: f"head.reg_init_conv.{m.group(1)}",
    ),
    (
        "reg init gn",
        re.compile(rf"bbox_head\.vfnet_reg_conv\.gn\.{_GN}"),
        lambda m: f"head.reg_init_conv.norm.{m.group(1)}",
    ),
    (
        "reg init",
        re.compile(rf"bbox_head\.vfnet_reg\.{_WB}"),
        lambda m: f"head.reg_init.{m.group(1)}",
    ),
    ("scales", re.compile(r"bbox_head\.scales\.(\d+)\.scale"), (STACK, "head.scales")),
    # ------------------------------------------------------------------ head: refinement
    (
        "reg refine star dconv",
        re.compile(r"bbox_head\.vfnet_reg_refine_dconv\.weight"),
        lambda m: "head.reg_refine_conv.weight",
    ),
    (
        "reg refine",
        re.compile(rf"bbox_head\.vfnet_reg_refine\.{_WB}"),
        lambda m: f"head.reg_refine.{m.group(1)}",
    ),
    (
        "scales refine",
        re.compile(r"bbox_head\.scales_refine\.(\d+)\.scale"),
        (STACK, "head.scales_refine"),
    ),
    # ------------------------------------------------------------------ head: classification
    (
        "cls star dconv",
        re.compile(r"bbox_head\.vfnet_cls_dconv\.weight"),
        lambda m: "head.cls_conv.weight",
    ),
    (
        "cls score",
        re.compile(rf"bbox_head\.vfnet_cls\.{_WB}"),
        lambda m: f"head.cls_score.{m.group(1)}",
    ),
]

# The rules of a ResNet/ResNeXt VFNet, and of a Res2Net VFNet.
RULES = _RESNET_BACKBONE + _NECK_AND_HEAD
RES2NET_RULES = _RES2NET_BACKBONE + _NECK_AND_HEAD


def is_res2net(keys) -> bool:
    """Whether an MMDetection state dict (keys with ``backbone.``) has a Res2Net backbone."""
    return "backbone.layer1.0.convs.0.weight" in set(keys)


def imagenet_backbone(keys) -> Optional[str]:
    """
    "Res2Net" or "ResNet/ResNeXt": the ImageNet network whose keys (without ``backbone.``: an
    official config's ``torchvision://`` or ``open-mmlab://`` weights) these are; None for others.
    """
    keys = set(keys)
    if "layer1.0.convs.0.weight" in keys:
        return "Res2Net"
    if {"conv1.weight", "layer1.0.conv1.weight"} <= keys:
        return "ResNet/ResNeXt"
    return None


def _dcn_towers(keys) -> set:
    """(tower, index) of the tower convs that are DCNv2 convs in an MMDetection state dict."""
    out = set()
    pat = re.compile(r"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.conv_offset\.weight")
    for k in keys:
        m = pat.fullmatch(k)
        if m:
            out.add((m.group(1), m.group(2)))
    return out


def convert_key(key: str, dcn_towers: Optional[set] = None, rules=RULES):
    """
    Map one MMDetection key.

    Args:
        key: MMDetection parameter name.
        dcn_towers: (tower, index) pairs of DCNv2 tower convs, see :func:`_dcn_towers`.
        rules: :data:`RULES` (ResNet/ResNeXt backbone) or :data:`RES2NET_RULES`.

    Returns:
        ``(rule_name, d2_key)`` for a plain rename, ``(rule_name, (d2_key, level))`` for a
        per-level scalar to stack, ``(rule_name, None)`` for a dropped key, or ``None`` when no
        rule matches.
    """
    dcn_towers = dcn_towers or set()
    for name, pattern, target in rules:
        m = pattern.fullmatch(key)
        if m is None:
            continue
        if target == DROP:
            return name, None
        if target == "tower_conv":
            tower, idx, param = m.groups()
            if (tower, idx) in dcn_towers:
                if param != "weight":
                    # mmcv's DCNv2 tower conv in a normed tower has no bias, nor has ours.
                    return None
                return name, f"head.{tower}_tower.{idx}.conv.weight"
            return name, f"head.{tower}_tower.{idx}.{param}"
        if isinstance(target, tuple) and target[0] == STACK:
            return name, (target[1], int(m.group(1)))
        return name, target(m)
    return None


def extract_state_dict(checkpoint) -> Dict[str, Tensor]:
    """
    The model state dict of a loaded MMDetection checkpoint: ``checkpoint["state_dict"]`` for
    a training checkpoint (with ``meta``, ``optimizer``, ...), or the checkpoint itself when it
    is already a mapping of names to tensors.
    """
    if not isinstance(checkpoint, Mapping):
        raise ConversionError(f"Expected a checkpoint dict, got {type(checkpoint).__name__}.")
    if "state_dict" in checkpoint:
        sd = checkpoint["state_dict"]
        if not isinstance(sd, Mapping):
            raise ConversionError(
                f"checkpoint['state_dict'] is a {type(sd).__name__}, not a mapping of tensors."
            )
    elif "model" in checkpoint and "__author__" in checkpoint:
        raise ConversionError(
            "This is already a Detectron2 checkpoint (keys 'model' and '__author__'); "
            "load it with DetectionCheckpointer directly."
        )
    else:
        sd = checkpoint
    bad = [k for k, v in sd.items() if not isinstance(v, Tensor)]
    if bad:
        raise ConversionError(
            f"The state dict holds non-tensor values, e.g. key '{bad[0]}' "
            f"({type(sd[bad[0]]).__name__}); {len(bad)} such key(s): {bad[:5]}."
        )
    return dict(sd)


def convert_mmdet_to_d2(
    state_dict: Mapping[str, Tensor],
) -> Tuple["OrderedDict[str, Tensor]", Dict[str, List[str]]]:
    """
    Convert an MMDetection VFNet state dict.

    Args:
        state_dict: MMDetection model state dict (see :func:`extract_state_dict`).

    Returns:
        converted: Detectron2 names to tensors. Tensors are the input tensors themselves (not
            copies), except ``head.scales`` and ``head.scales_refine`` (new (L,) tensors).
        report: ``{"dropped": [...], "stacked": [...]}`` MMDetection keys dropped / stacked.

    Raises:
        ConversionError: the state dict is not a VFNet's (no ``bbox_head.vfnet_cls.weight``),
            a key matches no rule, two keys map to the same name, or the per-level scales are
            not numbered 0..L-1 or not scalars.
    """
    if VFNET_MARKER_KEY not in state_dict:
        heads = sorted({k.split(".")[1] for k in state_dict if k.startswith("bbox_head.")})
        raise ConversionError(
            f"Not a VarifocalNet checkpoint: key '{VFNET_MARKER_KEY}' is missing"
            + (
                f" (its bbox_head has: {', '.join(heads[:8])})."
                if heads
                else " (no bbox_head.* key)."
            )
        )
    rules = RES2NET_RULES if is_res2net(state_dict) else RULES
    converted, report, unknown = _apply_rules(state_dict, rules)
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) of the checkpoint match no conversion rule, first "
            f"'{unknown[0]}': {unknown[:10]}. Only ResNet/ResNeXt/Res2Net(+DCNv2) + FPN + "
            "VFNetHead checkpoints of MMDetection are supported."
        )
    return converted, report


def convert_imagenet_backbone(
    state_dict: Mapping[str, Tensor],
) -> Tuple["OrderedDict[str, Tensor]", Dict[str, List[str]]]:
    """
    Convert the ImageNet backbone of an official VarifocalNet config to the names of this
    project's ``backbone.bottom_up`` (``MODEL.WEIGHTS`` of a training config; the neck and the
    head are left to their initialisation). Accepted, as their keys are (no ``backbone.``):

    * torchvision's ResNet-50/101 (``torchvision://resnet50``: ``IMAGENET1K_V1``) and
      open-mmlab's ResNeXt-101 32x4d / 64x4d (``open-mmlab://resnext101_32x4d``): torchvision's
      names, pytorch style (``MODEL.RESNETS.STRIDE_IN_1X1 False``, RGB, ImageNet mean/std);
    * MMDetection's Res2Net v1d (``open-mmlab://res2net101_v1d_26w_4s``).

    The classifier ``fc.*`` is dropped with the BatchNorm ``num_batches_tracked`` counters.

    Returns:
        (converted, report) as :func:`convert_mmdet_to_d2`.

    Raises:
        ConversionError: the keys carry ``backbone.`` (a detector: use
            :func:`convert_mmdet_to_d2`), it is neither a ResNet/ResNeXt nor a Res2Net, or a key
            matches no rule.
    """
    detector = [k for k in state_dict if k.startswith(("backbone.", "bbox_head.", "neck."))]
    if detector:
        raise ConversionError(
            f"key '{detector[0]}' is a detector's, not an ImageNet backbone's: convert it "
            "without --imagenet."
        )
    prefixed = {f"backbone.{k}": v for k, v in state_dict.items()}
    net = imagenet_backbone(state_dict)
    if net is None:
        raise ConversionError(
            "Not an ImageNet ResNet, ResNeXt or Res2Net checkpoint: neither 'conv1.weight' and "
            "'layer1.0.conv1.weight' (ResNet/ResNeXt) nor 'layer1.0.convs.0.weight' (Res2Net) "
            f"is among its keys (first keys: {list(state_dict)[:5]})."
        )
    rules = _RES2NET_BACKBONE if net == "Res2Net" else _RESNET_BACKBONE
    converted, report, unknown = _apply_rules(prefixed, rules + _IMAGENET_CLASSIFIER)
    if unknown:
        unknown = [k[len("backbone.") :] for k in unknown]
        raise ConversionError(
            f"{len(unknown)} key(s) of the checkpoint match no {net} rule, first "
            f"'{unknown[0]}': {unknown[:10]}."
        )
    return converted, report


def _apply_rules(state_dict: Mapping[str, Tensor], rules):
    """(converted, report, keys matching no rule) of `state_dict` under `rules`."""
    dcn_towers = _dcn_towers(state_dict.keys())
    converted: "OrderedDict[str, Tensor]" = OrderedDict()
    source: Dict[str, str] = {}
    stacks: Dict[str, Dict[int, Tuple[str, Tensor]]] = {}
    report: Dict[str, List[str]] = {"dropped": [], "stacked": []}
    unknown = []
    for key, value in state_dict.items():
        hit = convert_key(key, dcn_towers, rules)
        if hit is None:
            unknown.append(key)
            continue
        _, target = hit
        if target is None:
            report["dropped"].append(key)
            continue
        if isinstance(target, tuple):
            name, level = target
            stacks.setdefault(name, {})[level] = (key, value)
            report["stacked"].append(key)
            continue
        if target in source:
            raise ConversionError(f"Keys '{source[target]}' and '{key}' both map to '{target}'.")
        source[target] = key
        converted[target] = value
    for name, levels in stacks.items():
        n = len(levels)
        if sorted(levels) != list(range(n)):
            raise ConversionError(
                f"The per-level scales for '{name}' are numbered {sorted(levels)}, expected "
                f"0..{n - 1} (keys {[levels[i][0] for i in sorted(levels)]})."
            )
        values = []
        for i in range(n):
            key, v = levels[i]
            if v.numel() != 1:
                raise ConversionError(f"'{key}' has shape {tuple(v.shape)}, expected a scalar.")
            values.append(v.reshape(()))
        converted[name] = torch.stack(values)
    return converted, report, unknown


def describe_mmdet_state_dict(state_dict: Mapping[str, Tensor]) -> Dict[str, object]:
    """
    Architecture facts read from an MMDetection VFNet state dict, for summaries and for
    choosing the Detectron2 config: ResNet depth, groups and width per group (Res2Net: scales
    and base width), DCN stages, DCN in the head towers, number of classes, FPN levels, tower
    depth.
    """
    keys = list(state_dict.keys())
    res2net = is_res2net(keys)
    blocks = {}
    for k in keys:
        m = re.fullmatch(r"backbone\.layer([1-4])\.(\d+)\.conv1\.weight", k)
        if m:
            blocks[int(m.group(1))] = max(blocks.get(int(m.group(1)), 0), int(m.group(2)) + 1)
    per_stage = tuple(blocks.get(i, 0) for i in range(1, 5))
    depth = {(3, 4, 6, 3): 50, (3, 4, 23, 3): 101, (3, 8, 36, 3): 152}.get(per_stage)
    groups = width = None
    w = state_dict.get("backbone.layer1.0.conv2.weight")
    if w is not None:
        groups = w.shape[0] // w.shape[1]
        width = w.shape[1]
    scales = base_width = None
    if res2net:
        base_width = int(state_dict["backbone.layer1.0.convs.0.weight"].shape[0])
        split = re.compile(r"backbone\.layer1\.0\.convs\.\d+\.weight")
        scales = 1 + sum(1 for k in keys if split.fullmatch(k))
    offset = "convs.0.conv_offset" if res2net else "conv2.conv_offset"
    dcn_stages = [
        i + 1 for i in range(1, 5) if f"backbone.layer{i}.0.{offset}.weight" in state_dict
    ]
    cls = state_dict.get(VFNET_MARKER_KEY)
    tower = [re.fullmatch(r"bbox_head\.cls_convs\.(\d+)\..*", k) for k in keys]
    num_convs = len({m.group(1) for m in tower if m})
    return {
        "backbone": "Res2Net" if res2net else "ResNet",
        "blocks_per_stage": per_stage,
        "depth": depth,
        "num_groups": groups,
        "width_per_group": width,
        "scales": scales,
        "base_width": base_width,
        "deform_stages": [f"res{s}" for s in dcn_stages],
        "dcn_on_last_conv": bool(_dcn_towers(keys)),
        "num_classes": None if cls is None else int(cls.shape[0]),
        "num_convs": num_convs,
        "num_levels": len([k for k in keys if re.fullmatch(r"bbox_head\.scales\.\d+\.scale", k)]),
        "head_norm": "GN" if any(".gn." in k for k in keys if k.startswith("bbox_head.")) else "",
    }


# ---------------------------------------------------------------------------- checkpoint files
def load_checkpoint(path: str, allow_unsafe: bool = False):
    """
    torch.load with ``weights_only=True``. MMDetection checkpoints carry a ``meta`` dict
    (versions, class names, config text, sometimes numpy scalars); the numpy scalar/dtype
    reconstructors are allow-listed for the safe loader. Anything else needs ``allow_unsafe``
    (a full unpickling, only for files you trust; the tool's ``--allow-unsafe-pickle``).

    Raises:
        ConversionError: the safe loader refuses the file and `allow_unsafe` is False.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # noqa: BLE001 - re-raised below with context
        error = first
    try:
        import numpy as np

        allowed = [np.dtype, np.ndarray]
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            try:
                allowed.append(__import__(mod, fromlist=["scalar"]).scalar)
                allowed.append(__import__(mod, fromlist=["_reconstruct"])._reconstruct)
            except (ImportError, AttributeError):
                pass
        allowed += [type(np.dtype(t)) for t in ("float32", "float64", "int32", "int64", "bool")]
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as second:  # noqa: BLE001
        error = second
    if allow_unsafe:
        return torch.load(path, map_location="cpu", weights_only=False)
    raise ConversionError(
        f"cannot load '{path}' with torch.load(weights_only=True): {error}\n"
        "If you trust this file, rerun with --allow-unsafe-pickle."
    )


# The DCNv2 offset convs of a backbone: an ImageNet checkpoint has none (the classification
# network has plain 3x3 convs there); a DCN config initialises them to zero offsets.
BACKBONE_OFFSET_CONV = re.compile(r"backbone\.bottom_up\.res[2-5]\.\d+\.conv2_offset(\.\d+)?\.(weight|bias)")


def check_against_model(
    converted: Mapping[str, Tensor],
    config_file: str,
    opts=(),
    prefix: str = "",
    model_init: Optional["re.Pattern"] = None,
) -> List[str]:
    """
    Build the model of `config_file` (with the overrides `opts`, KEY VALUE pairs) on the CPU;
    return the problems of `converted` against its state dict (:func:`misfit`; empty when it
    fits). Needs Detectron2.
    """
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from ..config import add_vfnet_config

    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return misfit(converted, build_model(cfg).state_dict(), prefix, model_init)


def misfit(
    converted: Mapping[str, Tensor],
    model_state_dict: Mapping[str, Tensor],
    prefix: str = "",
    model_init: Optional["re.Pattern"] = None,
) -> List[str]:
    """
    The problems of `converted` against a model's state dict (empty when it fits): of the model's
    keys, those starting with `prefix` must all be in `converted`, except those that `model_init`
    matches (left to the model's initialisation); every key of `converted` must be the model's,
    in the model's shape.
    """
    problems = []
    for k, v in model_state_dict.items():
        # BatchNorm's step counter (dropped by the conversion) plays no part in the forward.
        if model_init is not None and model_init.fullmatch(k):
            continue
        if k.startswith(prefix) and k not in converted and not k.endswith("num_batches_tracked"):
            problems.append(f"missing in checkpoint: {k} {tuple(v.shape)}")
    for k, v in converted.items():
        if k not in model_state_dict:
            problems.append(f"not in the model: {k} {tuple(v.shape)}")
        elif tuple(v.shape) != tuple(model_state_dict[k].shape):
            problems.append(
                f"shape mismatch: {k} checkpoint {tuple(v.shape)} vs model "
                f"{tuple(model_state_dict[k].shape)}"
            )
    return problems


def read_mmdet_checkpoint(src: str, dst: str, allow_unsafe: bool = False):
    """
    The checkpoint file `src` to convert into `dst`, read with the safe loader (see
    :func:`load_checkpoint`), and its state dict.

    Raises:
        ConversionError: `src` is missing, is `dst`, or cannot be loaded safely.
    """
    if not os.path.isfile(src):
        raise ConversionError(f"no such file: {src}")
    if os.path.abspath(src) == os.path.abspath(dst):
        raise ConversionError("the output would overwrite the input.")
    checkpoint = load_checkpoint(src, allow_unsafe)
    try:
        return checkpoint, extract_state_dict(checkpoint)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None


def refuse_misfit(converted: Mapping[str, Tensor], config_file: str, opts=(), prefix: str = "", model_init=None):
    """
    Raise a ConversionError listing every problem of `converted` against the model of
    `config_file` (:func:`check_against_model`), or for config overrides `opts` without a
    config; nothing when `config_file` is empty.
    """
    if not config_file:
        if opts:
            raise ConversionError("config overrides need --config-file.")
        return
    problems = check_against_model(converted, config_file, opts, prefix, model_init)
    if problems:
        lines = "\n  ".join(problems)
        raise ConversionError(
            f"the converted checkpoint does not fit {config_file} "
            f"({len(problems)} problem(s)); nothing written:\n  {lines}"
        )


def detectron2_checkpoint(state_dict: Mapping[str, Tensor], **extra) -> Dict[str, object]:
    """
    The Detectron2 checkpoint of the converted `state_dict`: ``{"model": state_dict,
    "__author__": "mmdetection", "matching_heuristics": False}`` (loaded by exact names), with
    the entries `extra`.
    """
    return {"model": state_dict, "__author__": "mmdetection", "matching_heuristics": False, **extra}


def save_converted(state_dict: Mapping[str, Tensor], path: str, **extra) -> None:
    """
    Write :func:`detectron2_checkpoint` of `state_dict` (with the entries `extra`) to `path`,
    atomically: a failure leaves no partial file.
    """
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    checkpoint = detectron2_checkpoint(state_dict, **extra)
    atomic_write(path, lambda f: torch.save(checkpoint, f))


def conversion_summary(src: str, dst: str, checkpoint, state_dict, converted, report, imagenet: bool, config_file: str) -> str:
    """The lines tools/convert_mmdet_to_d2.py prints: source, tensor counts, architecture, check, output."""
    info = describe_mmdet_state_dict(state_dict)
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    version = meta.get("mmdet_version") if isinstance(meta, dict) else None
    counters = [k for k in report["dropped"] if k.endswith("num_batches_tracked")]
    others = len(report["dropped"]) - len(counters)
    if info["backbone"] == "Res2Net":
        width = "{w}w x {s}s".format(w=info["base_width"], s=info["scales"])
    else:
        width = "groups {g} x width {w}".format(g=info["num_groups"], w=info["width_per_group"])
    summary = [
        f"{src}" + (f" (mmdet {version})" if version else ""),
        f"  {len(state_dict)} tensors -> {len(converted)} "
        f"({len(counters)} num_batches_tracked dropped, "
        + (f"{others} unused tensors dropped, " if others else "")
        + f"{len(report['stacked'])} per-level scales stacked into head.scales/head.scales_refine)",
        "  architecture: {net}{depth} blocks {blocks} {width}, DCNv2 in {dcn}, ".format(
            net=info["backbone"],
            depth=info["depth"] or "?",
            blocks=info["blocks_per_stage"],
            width=width,
            dcn=info["deform_stages"] or "none",
        )
        + (
            "ImageNet backbone only"
            if imagenet
            else "DCN tower conv: {tower}, {k} classes, {lv} levels".format(
                tower=info["dcn_on_last_conv"], k=info["num_classes"], lv=info["num_levels"]
            )
        ),
    ]
    if config_file:
        summary.append(f"  checked against {config_file}: every key and shape matches")
    summary.append(f"  wrote {dst}")
    return "\n".join(summary)


def convert_checkpoint_file(
    src: str,
    dst: str,
    config_file: str = "",
    opts=(),
    allow_unsafe: bool = False,
    imagenet: bool = False,
) -> str:
    """
    Convert the MMDetection checkpoint file `src` (with `imagenet`: an ImageNet backbone,
    :func:`convert_imagenet_backbone`, checked against the config's ``backbone.bottom_up`` only)
    and write it to `dst` (:func:`save_converted`). With `config_file` (and the config
    overrides `opts`) every key and shape is first checked against that config's model
    (:func:`refuse_misfit`, needs Detectron2); all problems are reported at once and nothing is
    written.

    Returns:
        the summary tools/convert_mmdet_to_d2.py prints (:func:`conversion_summary`).

    Raises:
        ConversionError: `src` is missing, is `dst`, cannot be loaded safely (see
            :func:`load_checkpoint`) or converted, does not fit the config, or `opts` are given
            without `config_file`.
    """
    checkpoint, state_dict = read_mmdet_checkpoint(src, dst, allow_unsafe)
    try:
        if imagenet:
            converted, report = convert_imagenet_backbone(state_dict)
            state_dict = {f"backbone.{k}": v for k, v in state_dict.items()}
        else:
            converted, report = convert_mmdet_to_d2(state_dict)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    # An ImageNet backbone for a DCN config: the offset convs start from the model's init.
    if imagenet:
        refuse_misfit(converted, config_file, opts, "backbone.bottom_up.", BACKBONE_OFFSET_CONV)
    else:
        refuse_misfit(converted, config_file, opts)
    save_converted(converted, dst)
    return conversion_summary(src, dst, checkpoint, state_dict, converted, report, imagenet, config_file)
