#!/usr/bin/env python
"""
Speed and memory of VFNet against Detectron2's own FCOS and RetinaNet (same ResNet-50-FPN, same
input), measured side by side in one run. Prints tables; --json and --plot save them.

    python tools/benchmark.py                       # CPU, everything
    python tools/benchmark.py --device cuda --amp   # GPU, autocast
    python tools/benchmark.py --precisions fp32 amp --skip-inference --skip-scaling
                                                    # CPU training: fp32 and bf16 rows, speed-ups
    python tools/benchmark.py --skip-training --skip-scaling --iters 5
    python tools/benchmark.py --dataset mine=val.json:images/ --images mine   # real images
    python tools/benchmark.py --models VFNet VFNet-R2-101 VFNet-R2-101-DCN --size 800 1333 \
        --skip-training --skip-scaling                # Res2Net-101 beside R-50, same table
    python tools/benchmark.py --models VFNet VFNet-FCOS-backbone FCOS --precisions fp32 amp --skip-scaling
                                                    # the heads alone: VFNet on FCOS's backbone settings

Inputs are random images of --size / --train-size with --train-boxes random boxes, or, with
--images NAME, the first images of a registered dataset (with their boxes for training), at
their own size.

Under autocast (--amp, --precisions amp) every model trains as SOLVER.AMP.ENABLED trains VFNet
(on CPU: bf16, no loss scaling); Detectron2's FCOS needs one workaround there, fvcore's GIoU loss
on float32 boxes (dev/benchmark.py: float32_giou_loss, where its training fails and why).

Each measurement runs in a fresh process, so that its peak memory (RSS on CPU,
torch.cuda.max_memory_allocated on GPU) is its own. All models have random weights; their score
thresholds are set to 0 so that post-processing always handles the full top-k candidates of
every level (the worst case).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.benchmark import MODELS, VFNET_CONFIGS, run_benchmark  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted({*MODELS, *VFNET_CONFIGS}),
                   help="models to measure, in the tables' order (VFNet: R-50; VFNet-R2-101[-DCN]: Res2Net-101; "
                        "VFNet-FCOS-backbone: R-50 with the backbone settings of Detectron2's FCOS)")
    p.add_argument("--amp", action="store_true", help="autocast (fp16 on CUDA, bf16 on CPU): --precisions amp")
    p.add_argument("--precisions", nargs="+", choices=["fp32", "amp"],
                   help="the precisions to measure, each model in each (default: fp32, or amp with --amp); "
                        "'fp32 amp' gives the fp32 and autocast rows side by side with the speed-up")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: torch's default)")
    p.add_argument("--size", type=int, nargs=2, default=[800, 1216], metavar=("H", "W"), help="inference input")
    p.add_argument("--train-size", type=int, nargs=2, default=[512, 768], metavar=("H", "W"))
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-boxes", type=int, default=10, help="ground-truth boxes per training image")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--atss-boxes", type=int, nargs="+", default=[0, 1, 10, 100, 1000])
    p.add_argument("--atss-sizes", type=int, nargs="+", default=[400, 600, 800, 1000, 1333],
                   help="shorter sides for the ATSS scaling against image size (4:3 images)")
    p.add_argument("--atss-size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    p.add_argument("--dataset", action="append", default=[], metavar="NAME=JSON:IMAGE_DIR",
                   help="register a COCO-format dataset under NAME (repeatable)")
    p.add_argument("--images", metavar="NAME", help="take the inputs from this registered dataset")
    p.add_argument("--skip-inference", action="store_true")
    p.add_argument("--skip-training", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--json", help="write all results to this JSON file")
    p.add_argument("--plot", help="write the ATSS scaling plot to this PNG file")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    args.precisions = args.precisions or ["amp" if args.amp else "fp32"]
    run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
