"""
Convert the state dict of an MMDetection RetinaNet (ResNet backbone, FPN neck, ``RetinaHead``:
the official RetinaNet + FL and RetinaNet + VFL models of VarifocalNet) to the parameter names of
Detectron2's RetinaNet (``RetinaNet`` / ``IoUAwareRetinaNet`` with
``build_retinanet_resnet_fpn_backbone``).

The backbone and FPN rules are VFNet's (:data:`vfnet.checkpoint.converter.RULES`): MMDetection's
RetinaNet FPN (``add_extra_convs='on_input'``) computes P6 from C5, as Detectron2's
``LastLevelP6P7`` of ``build_retinanet_resnet_fpn_backbone`` does, under the same names
(``fpn_convs.3`` / ``fpn_convs.4`` -> ``top_block.p6`` / ``top_block.p7``). The head rules:

* ``bbox_head.cls_convs.i.conv`` / ``reg_convs.i.conv`` (no norm) are ``head.cls_subnet.{2i}`` /
  ``head.bbox_subnet.{2i}`` (Detectron2's Sequential of conv, ReLU, conv, ...);
* ``bbox_head.retina_cls`` / ``retina_reg`` are ``head.cls_score`` / ``head.bbox_pred``, with
  their output channels permuted between the two anchor orders. Both lay a location's
  channels out anchor by anchor (anchor a's K class logits, or 4 deltas, at a * K ...), but
  MMDetection's AnchorGenerator numbers a location's anchors ratio-major (a = ratio * S +
  scale) and Detectron2's DefaultAnchorGenerator size-major (a = size * R + ratio).

Pure torch (no Detectron2, no MMDetection); the file-level function checks against a config's
model with Detectron2 when asked.
"""
import re
from collections import OrderedDict
from typing import Dict, List, Mapping, Tuple

import torch
from torch import Tensor

from .converter import (
    DROP,
    RULES,
    ConversionError,
    read_mmdet_checkpoint,
    refuse_misfit,
    save_converted,
)

__all__ = [
    "RETINANET_MARKER_KEY",
    "RETINANET_RULES",
    "anchor_permutation",
    "convert_retinanet_mmdet_to_d2",
    "convert_retinanet_checkpoint_file",
]

# A checkpoint without this key has no RetinaHead.
RETINANET_MARKER_KEY = "bbox_head.retina_cls.weight"

# VFNet's rules that apply (its ResNet and FPN names; P6 / P7 under the same names).
# fmt: off
_BACKBONE_AND_NECK = {
    "stem conv", "stem bn", "block conv", "block bn", "shortcut conv", "shortcut bn",
    "bn counter", "fpn lateral", "fpn output", "fpn P6", "fpn P7",
}
# fmt: on
_WB = r"(weight|bias)"
_SUBNET = {"cls": "cls", "reg": "bbox"}
PERMUTED = "permuted"  # a prediction conv: renamed, output channels in Detectron2's anchor order

# (name, pattern, target): as vfnet.checkpoint.converter.RULES; target (PERMUTED, d2 name, the
# channels per anchor) for the prediction convs.
RETINANET_RULES: List[Tuple[str, "re.Pattern", object]] = [
    r for r in RULES if r[0] in _BACKBONE_AND_NECK
] + [
    (
        "subnet conv",
        re.compile(rf"bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.{_WB}"),
        lambda m: f"head.{_SUBNET[m.group(1)]}_subnet.{2 * int(m.group(2))}.{m.group(3)}",
    ),
    ("cls score", re.compile(rf"bbox_head\.retina_cls\.{_WB}"), (PERMUTED, "head.cls_score", None)),
    ("box deltas", re.compile(rf"bbox_head\.retina_reg\.{_WB}"), (PERMUTED, "head.bbox_pred", 4)),
]


def anchor_permutation(num_sizes: int, num_ratios: int) -> Tensor:
    """
    (A,) for each anchor of a location in Detectron2's order (size-major: size * R + ratio) the
    index of the same anchor in MMDetection's order (ratio-major: ratio * S + size).
    """
    size, ratio = torch.meshgrid(torch.arange(num_sizes), torch.arange(num_ratios), indexing="ij")
    return (ratio * num_sizes + size).reshape(-1)


def _permute_channels(t: Tensor, per_anchor: int, perm: Tensor) -> Tensor:
    """The (A * per_anchor, ...) output channels of a prediction conv, anchors reordered."""
    return t.reshape(len(perm), per_anchor, *t.shape[1:])[perm].reshape(t.shape)


def convert_retinanet_mmdet_to_d2(
    state_dict: Mapping[str, Tensor], num_sizes: int = 3, num_ratios: int = 3
) -> Tuple["OrderedDict[str, Tensor]", Dict[str, List[str]]]:
    """
    Convert an MMDetection RetinaNet state dict.

    Args:
        state_dict: MMDetection model state dict (see `extract_state_dict`).
        num_sizes, num_ratios: the anchors per location, sizes (MMDetection's scales_per_octave)
            x aspect ratios; 3 x 3 for the official models.

    Returns:
        converted: Detectron2 names to tensors (the input tensors, new ones for the permuted
            prediction convs).
        report: ``{"dropped": [...], "permuted": [...]}`` the MMDetection keys dropped / permuted.

    Raises:
        ConversionError: no ``bbox_head.retina_cls.weight``, a key matching no rule, or
            prediction convs whose channels are not num_sizes x num_ratios anchors.
    """
    if RETINANET_MARKER_KEY not in state_dict:
        raise ConversionError(
            f"Not a RetinaNet checkpoint: key '{RETINANET_MARKER_KEY}' is missing"
            + (" (it is a VarifocalNet's: convert it without --arch retinanet)."
               if "bbox_head.vfnet_cls.weight" in state_dict else ".")  # fmt: skip
        )
    num_anchors = num_sizes * num_ratios
    reg_channels = state_dict["bbox_head.retina_reg.weight"].shape[0]
    if reg_channels != 4 * num_anchors:
        raise ConversionError(
            f"bbox_head.retina_reg has {reg_channels} output channels, expected 4 x {num_sizes} "
            f"sizes x {num_ratios} ratios = {4 * num_anchors} (the anchors per location)."
        )
    num_classes = state_dict[RETINANET_MARKER_KEY].shape[0] // num_anchors
    perm = anchor_permutation(num_sizes, num_ratios)
    converted: "OrderedDict[str, Tensor]" = OrderedDict()
    report: Dict[str, List[str]] = {"dropped": [], "permuted": []}
    unknown = []
    for key, value in state_dict.items():
        for _, pattern, target in RETINANET_RULES:
            m = pattern.fullmatch(key)
            if m is not None:
                break
        else:
            unknown.append(key)
            continue
        if target == DROP:
            report["dropped"].append(key)
        elif isinstance(target, tuple):
            _, name, per_anchor = target
            per_anchor = per_anchor or num_classes
            converted[f"{name}.{m.group(1)}"] = _permute_channels(value, per_anchor, perm)
            report["permuted"].append(key)
        else:
            converted[target(m)] = value
    if unknown:
        raise ConversionError(
            f"{len(unknown)} key(s) of the checkpoint match no RetinaNet conversion rule, first "
            f"'{unknown[0]}': {unknown[:10]}. Only ResNet + FPN + RetinaHead checkpoints of "
            "MMDetection are supported."
        )
    return converted, report


def convert_retinanet_checkpoint_file(
    src: str, dst: str, config_file: str = "", opts=(), allow_unsafe: bool = False
) -> str:
    """
    `vfnet.checkpoint.converter.convert_checkpoint_file` for a RetinaNet: convert `src`, check
    it against `config_file`'s model when given, write `dst` atomically. Returns the summary.
    """
    _, state_dict = read_mmdet_checkpoint(src, dst, allow_unsafe)
    try:
        converted, report = convert_retinanet_mmdet_to_d2(state_dict)
    except ConversionError as e:
        raise ConversionError(f"{src}: {e}") from None
    refuse_misfit(converted, config_file, opts)
    save_converted(converted, dst)
    lines = [
        src,
        f"  RetinaNet: {len(converted)} tensors ({len(report['dropped'])} num_batches_tracked "
        f"dropped; {', '.join(report['permuted'])} in Detectron2's anchor order)",
    ]
    if config_file:
        lines.append(f"  checked against {config_file}: every key and shape matches")
    lines.append(f"  wrote {dst}")
    return "\n".join(lines)
