#!/usr/bin/env python3
"""
Convert an MMDetection VarifocalNet checkpoint (e.g. the official
``vfnet_r50_fpn_1x_coco_20201027-38db6f58.pth``) to a Detectron2 checkpoint of this project, or
with ``--arch retinanet`` an MMDetection RetinaNet (the official RetinaNet + FL / + VFL models)
to Detectron2's RetinaNet. (MODEL.WEIGHTS takes such a checkpoint as it is, a file, an address
or vfnet://NAME, converted on load: docs/MODEL_ZOO.md. This tool writes a converted file of your
own, for programs that load it with Detectron2's checkpointer.)

    python tools/convert_mmdet_to_d2.py IN.pth OUT.pth \
        [--config-file configs/mmdet/VFNet_R_50_FPN_1x.yaml] [KEY VALUE ...]
    python tools/convert_mmdet_to_d2.py --arch retinanet IN.pth OUT.pth \
        [--config-file configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml]

The output is ``{"model": state_dict, "__author__": "mmdetection", "matching_heuristics":
False}``: ``DetectionCheckpointer(model).load(OUT)`` loads it by exact names (no heuristic
renaming). With ``--config-file`` (and optional config overrides after it) the model of that
config is built on the CPU and every key and shape is checked; all problems are reported at
once and nothing is written. The output is written to a temporary file in the target folder
and renamed into place, so a failed run leaves no partial file.

With ``--imagenet`` the input is the ImageNet backbone of an official config (keys without
``backbone.``; the output holds ``backbone.bottom_up.*`` only, for ``MODEL.WEIGHTS`` of a training
config): torchvision's ResNet-50/101 (``torchvision://resnet50``, the IMAGENET1K_V1 weights),
open-mmlab's ResNeXt-101 32x4d / 64x4d, or MMDetection's Res2Net-101 v1d:

    wget https://download.pytorch.org/models/resnet50-0676ba61.pth
    python tools/convert_mmdet_to_d2.py --imagenet resnet50-0676ba61.pth \
        resnet50_d2.pth --config-file configs/VFNet_R_50_FPN_1x.yaml
    python tools/convert_mmdet_to_d2.py --imagenet res2net101_v1d_26w_4s_mmdetv2-f0a600f9.pth \
        res2net101_v1d_26w_4s_d2.pth --config-file configs/VFNet_R2_101_FPN_MS_2x.yaml
"""

import argparse
import importlib.util
import os
import sys

if importlib.util.find_spec("vfnet") is None:  # not installed: use the source tree
    sys.path.insert(
        0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "projects", "VFNet")
    )
from vfnet.checkpoint.converter import ConversionError, convert_checkpoint_file  # noqa: E402
from vfnet.checkpoint.retinanet_converter import convert_retinanet_checkpoint_file  # noqa: E402


CONVERTERS = {"vfnet": convert_checkpoint_file, "retinanet": convert_retinanet_checkpoint_file}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("input", help="MMDetection checkpoint (.pth)")
    parser.add_argument("output", help="Detectron2 checkpoint to write (.pth)")
    parser.add_argument(
        "--config-file", default="", help="check keys and shapes against this config's model"
    )
    parser.add_argument(
        "--arch",
        choices=sorted(CONVERTERS),
        default="vfnet",
        help="the checkpoint's detector: VarifocalNet, or RetinaNet (ResNet-FPN, RetinaHead)",
    )
    parser.add_argument(
        "--allow-unsafe-pickle",
        action="store_true",
        help="fall back to torch.load(weights_only=False) for files the safe loader refuses",
    )
    parser.add_argument(
        "--imagenet",
        action="store_true",
        help="the input is an ImageNet ResNet/ResNeXt/Res2Net backbone (keys without 'backbone.'), not a VFNet",
    )
    parser.add_argument(
        "opts", nargs="*", help="config overrides (KEY VALUE pairs), with --config-file"
    )
    args = parser.parse_intermixed_args(argv)
    try:
        if args.imagenet and args.arch != "vfnet":
            raise ConversionError("--imagenet (an ImageNet backbone) is not for --arch retinanet")
        extra = (args.imagenet,) if args.arch == "vfnet" else ()
        summary = CONVERTERS[args.arch](
            args.input, args.output, args.config_file, args.opts, args.allow_unsafe_pickle, *extra
        )
    except ConversionError as e:
        raise SystemExit(f"error: {e}")
    print(summary)


if __name__ == "__main__":
    main()
