#!/usr/bin/env python
"""
VFNet on the CPU runtimes it deploys to, side by side in one run: eager PyTorch fp32 and bf16,
TorchScript, onnxruntime and OpenVINO on both exported graphs (the head's deformable convs as
GridSample + MatMul or as ONNX DeformConv), OpenVINO bf16 (where the CPU has it) and int8 (NNCF,
calibrated on --calibration), and Detectron2's FCOS exported the same way as the reference.
Median s/image and peak RSS of each in a fresh process; --batch N adds s/image over N images at
once; --eval NAME adds each one's COCO box AP (give --weights: random weights have none).

    python tools/benchmark_export.py --size 800 1333 --threads 2          # random weights
    R=../shared/datasets/raccoon
    python tools/benchmark_export.py --config-file configs/VFNet_Raccoon.yaml \\
        --weights output/vfnet_raccoon/model_final.pth \\
        --dataset raccoon_train=$R/train.json:$R/images --dataset raccoon_val=$R/val.json:$R/images \\
        --images raccoon_val --size 800 1333 --eval raccoon_val --calibration raccoon_train --batch 2

The exported files are kept in --work-dir and made again only with --export-again (or when the
weights change: use another --work-dir).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev import CONFIGS  # noqa: E402
from dev.benchmark_export import ROWS, run_benchmark  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default=os.path.join(CONFIGS, "VFNet_R_50_FPN_1x.yaml"), metavar="FILE")
    p.add_argument("--weights", default="", help="MODEL.WEIGHTS of the VFNet (default: random weights)")
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW",
                   help=f"runtimes to measure, in the table's order (default all): {', '.join(ROWS)}")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"),
                   help="random input of H x W; with --images: MIN_SIZE_TEST and MAX_SIZE_TEST")
    p.add_argument("--threads", type=int, default=0, help="threads of every runtime (0: their default)")
    p.add_argument("--iters", type=int, default=10, help="timed runs per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=1, help="also time N images at once (default 1: not)")
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_DIR",
                   help="register a COCO-format dataset under NAME (repeatable)")
    p.add_argument("--images", metavar="NAME", help="time the first image of this dataset")
    p.add_argument("--eval", metavar="NAME", help="COCO box AP of every VFNet row on this dataset")
    p.add_argument("--calibration", metavar="NAME", help="int8: calibrate on the images of this dataset")
    p.add_argument("--calib-size", type=int, default=30, help="int8: calibration images")
    p.add_argument("--work-dir", default="output/benchmark_export", help="where the exported files go")
    p.add_argument("--export-again", action="store_true", help="export even where a file exists")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides of the VFNet, KEY VALUE pairs")
    return p.parse_args(argv)


def main(argv=None):
    run_benchmark(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
