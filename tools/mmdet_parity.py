#!/usr/bin/env python3
"""
Numerical parity of this project's VFNet with MMDetection's VarifocalNet.

Builds MMDetection's VFNet from its official config (``configs/vfnet/*.py`` shipped with
mmdet 3.3.0; ``num_classes`` reduced), perturbs EVERY parameter and BatchNorm statistic away
from its default, saves it as an MMDetection checkpoint, converts it as
``tools/convert_mmdet_to_d2.py`` does and loads the result into the Detectron2 model of
``configs/mmdet/*.yaml`` with ``DetectionCheckpointer``. On the same normalised input it then
compares: FPN features P3-P7, per level classification logits and initial / refined
distances, the ATSS assignment (positives, classes and target boxes), the training losses,
and the post-processed detections on a real image (in resized-image and in original-image
coordinates). Optionally (``--pipelines``) it also measures each framework's own
preprocessing (decode, resize size, interpolation) and its effect on the detections.

Run it with the interpreter that has MMDetection (a separate virtualenv):

    /work/venv-mmdet/bin/python tools/mmdet_parity.py [--variant r50|r50_dcn|r2_101|r2_101_dcn|all] [--pipelines]

mmcv-lite has no compiled ops: when ``mmcv._ext`` is missing, a stand-in module is installed
whose deformable convolutions call ``torchvision.ops.deform_conv2d`` (same (dy, dx) offset
layout as mmcv's kernel) and whose NMS calls ``torchvision.ops.nms`` (same ``IoU > thr``
suppression, offset 0); every other mmcv op raises. Detectron2's modulated deformable conv
(used by the DCN backbones) has no CPU kernel: on CPU tensors the harness routes it to
torchvision as well. The deformable-conv kernels are therefore the same on both sides; what
is compared is everything around them (weights, offsets, masks, wiring).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.mmdet_parity import (  # noqa: E402
    DEFAULT_IMAGE,
    VARIANTS,
    end_to_end_report,
    pipeline_report,
    postprocess_edge_case_report,
    run_parity,
)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--variant", default="all", choices=["all", *VARIANTS])
    parser.add_argument("--num-classes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image", default=DEFAULT_IMAGE)
    parser.add_argument(
        "--pipelines",
        action="store_true",
        help="also compare each framework's own preprocessing and full test pipeline",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    for variant in VARIANTS if args.variant == "all" else [args.variant]:
        report = run_parity(variant, args.num_classes, args.seed, args.image)
        print(
            f"\n=== {variant}: MMDetection {VARIANTS[variant][0]} vs Detectron2 {VARIANTS[variant][1]} "
            f"(num_classes={args.num_classes}, seed={args.seed})"
        )
        print(report.table())
    r = postprocess_edge_case_report(args.num_classes)
    print("\n=== post-processing edge case (boxes clipped to empty)")
    print(r.table())
    if args.pipelines:
        print("\n=== preprocessing (MMDetection test pipeline vs Detectron2 DatasetMapper)")
        for k, v in pipeline_report(args.image).items():
            print(f"{k}: {v}")
        for k, v in end_to_end_report("r50", args.image).items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
