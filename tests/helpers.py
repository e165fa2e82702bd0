"""Paths, the small model, the train_net runners and the checkpoint helpers the tests share."""
import os
import re
from collections import OrderedDict
from typing import Callable, List, Mapping, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The raccoon dataset lives beside the project: tests that use it skip where it is absent.
RACCOON = os.path.join(os.path.dirname(ROOT), "shared", "datasets", "raccoon")
RACCOON_IMAGES = os.path.join(RACCOON, "images")
BASE_CONFIG = os.path.join(ROOT, "configs", "Base-VFNet.yaml")
# Overrides of Base-VFNet.yaml for a small, fast model: ResNet-18 with BN, 64-channel FPN and
# head, 3 classes, on the CPU.
SMALL = [
    "MODEL.DEVICE", "cpu",
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.RESNETS.NORM", "BN",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "MODEL.VFNET.NUM_CLASSES", "3",
    "MODEL.WEIGHTS", "",
]  # fmt: skip

# Overrides of configs/VFNet_Shapes_Demo.yaml for tools/train_net.py runs of a few seconds.
TINY = [
    "MODEL.RESNETS.DEPTH", "18",
    "MODEL.FPN.OUT_CHANNELS", "64",
    "DATALOADER.NUM_WORKERS", "0",
    "SOLVER.WARMUP_ITERS", "2",
    "SOLVER.STEPS", "(4,)",
    "INPUT.MIN_SIZE_TRAIN", "(64,)",
    "INPUT.MAX_SIZE_TRAIN", "96",
    "INPUT.MIN_SIZE_TEST", "64",
    "INPUT.MAX_SIZE_TEST", "96",
    "SEED", "7",
]  # fmt: skip


def small_cfg(*opts):
    """Base-VFNet.yaml with the SMALL overrides, then `opts` (needs Detectron2)."""
    from detectron2.config import get_cfg

    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(BASE_CONFIG)
    cfg.merge_from_list(SMALL + list(opts))
    return cfg


DETERMINISTIC_TRAIN_NET = os.path.join(ROOT, "tests", "scripts", "deterministic_train_net.py")


def start_deterministic(log_path, kill, train_net_args):
    """
    Start tests/scripts/deterministic_train_net.py (tools/train_net.py under bitwise-reproducible
    settings, one thread) in the background with `kill` (its --kill-* options) and
    `train_net_args`, its output appended to `log_path`.
    """
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, DETERMINISTIC_TRAIN_NET, *kill, "--", *train_net_args]
    log = open(log_path, "a")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)


def finish(proc, log_path, returncode=0):
    """Wait for a run of :func:`start_deterministic`; assert its exit status (showing its log)."""
    assert proc.wait(timeout=600) == returncode, open(log_path).read()[-6000:]


# The converter's rules run backwards: Detectron2 names of this project's VFNet to MMDetection's.
# Needs only torch (the converter module imports no Detectron2).
import torch  # noqa: E402

from vfnet.checkpoint.converter import _BN, _GN, _WB, ConversionError  # noqa: E402

_INVERSE: List[Tuple["re.Pattern", Callable[["re.Match"], str]]] = [
    (re.compile(r"backbone\.bottom_up\.stem\.conv1\.weight"), lambda m: "backbone.conv1.weight"),
    (
        re.compile(rf"backbone\.bottom_up\.stem\.conv1\.norm\.{_BN}"),
        lambda m: f"backbone.bn1.{m.group(1)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.conv{m.group(3)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv([123])\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.bn{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2_offset\.{_WB}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.conv2.conv_offset.{m.group(3)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.0.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.{m.group(3)}",
    ),
    (
        re.compile(rf"backbone\.fpn_lateral([3-5])\.{_WB}"),
        lambda m: f"neck.lateral_convs.{int(m.group(1)) - 3}.conv.{m.group(2)}",
    ),
    (
        re.compile(rf"backbone\.fpn_output([3-5])\.{_WB}"),
        lambda m: f"neck.fpn_convs.{int(m.group(1)) - 3}.conv.{m.group(2)}",
    ),
    (
        re.compile(rf"backbone\.top_block\.p6\.{_WB}"),
        lambda m: f"neck.fpn_convs.3.conv.{m.group(1)}",
    ),
    (
        re.compile(rf"backbone\.top_block\.p7\.{_WB}"),
        lambda m: f"neck.fpn_convs.4.conv.{m.group(1)}",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.conv_offset\.{_WB}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.conv_offset.{m.group(3)}",
    ),
    (
        re.compile(r"head\.(cls|reg)_tower\.(\d+)\.conv\.weight"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.weight",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.norm\.{_GN}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.gn.{m.group(3)}",
    ),
    (
        re.compile(rf"head\.(cls|reg)_tower\.(\d+)\.{_WB}"),
        lambda m: f"bbox_head.{m.group(1)}_convs.{m.group(2)}.conv.{m.group(3)}",
    ),
    (
        re.compile(rf"head\.reg_init_conv\.norm\.{_GN}"),
        lambda m: f"bbox_head.vfnet_reg_conv.gn.{m.group(1)}",
    ),
    (
        re.compile(rf"head\.reg_init_conv\.{_WB}"),
        lambda m: f"bbox_head.vfnet_reg_conv.conv.{m.group(1)}",
    ),
    (re.compile(rf"head\.reg_init\.{_WB}"), lambda m: f"bbox_head.vfnet_reg.{m.group(1)}"),
    (
        re.compile(r"head\.reg_refine_conv\.weight"),
        lambda m: "bbox_head.vfnet_reg_refine_dconv.weight",
    ),
    (re.compile(rf"head\.reg_refine\.{_WB}"), lambda m: f"bbox_head.vfnet_reg_refine.{m.group(1)}"),
    (re.compile(r"head\.cls_conv\.weight"), lambda m: "bbox_head.vfnet_cls_dconv.weight"),
    (re.compile(rf"head\.cls_score\.{_WB}"), lambda m: f"bbox_head.vfnet_cls.{m.group(1)}"),
]


# Res2Net's names where they differ from ResNet's (tried first for a Res2Net backbone).
_INVERSE_RES2NET: List[Tuple["re.Pattern", Callable[["re.Match"], str]]] = [
    (
        re.compile(r"backbone\.bottom_up\.stem\.conv([123])\.weight"),
        lambda m: f"backbone.stem.{3 * (int(m.group(1)) - 1)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.stem\.conv([123])\.norm\.{_BN}"),
        lambda m: f"backbone.stem.{3 * (int(m.group(1)) - 1) + 1}.{m.group(2)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2\.(\d+)\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.convs.{m.group(3)}.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2\.(\d+)\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.bns.{m.group(3)}.{m.group(4)}",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.conv2_offset\.(\d+)\.{_WB}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.convs.{m.group(3)}"
        f".conv_offset.{m.group(4)}",
    ),
    (
        re.compile(r"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.weight"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.1.weight",
    ),
    (
        re.compile(rf"backbone\.bottom_up\.res([2-5])\.(\d+)\.shortcut\.norm\.{_BN}"),
        lambda m: f"backbone.layer{int(m.group(1)) - 1}.{m.group(2)}.downsample.2.{m.group(3)}",
    ),
]


def d2_to_mmdet(state_dict: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """
    Inverse of vfnet.checkpoint.converter.convert_mmdet_to_d2 (without ``num_batches_tracked``): Detectron2 names
    of this project's VFNet (ResNet or Res2Net, told by ``stem.conv2``) to MMDetection's.
    ``head.scales`` / ``head.scales_refine`` are split into per-level 0-dim tensors. Builds
    MMDetection-style state dicts for the converter's and the parity tests.
    """
    res2net = "backbone.bottom_up.stem.conv2.weight" in state_dict
    inverse = _INVERSE_RES2NET + _INVERSE if res2net else _INVERSE
    out: "OrderedDict[str, torch.Tensor]" = OrderedDict()
    for key, value in state_dict.items():
        m = re.fullmatch(r"head\.(scales|scales_refine)", key)
        if m:
            for i, v in enumerate(value.unbind(0)):
                out[f"bbox_head.{m.group(1)}.{i}.scale"] = v
            continue
        for pattern, fn in inverse:
            m = pattern.fullmatch(key)
            if m:
                out[fn(m)] = value
                break
        else:
            raise ConversionError(f"No inverse rule for Detectron2 key '{key}'.")
    return out
