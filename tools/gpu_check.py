#!/usr/bin/env python
"""
The prepared check of the GPU path, on one GPU in a few minutes (one process):

1. Detectron2's deformable CUDA kernels (DCN and DCNv2, through the head's and the backbone's
   layers) against the CPU gather kernel, forward and backward, fp32 and autocast, NCHW and
   channels-last inputs;
2. 50 training iterations of VFNet R-50 and R-50-DCN at 800x1333, batch 2, fp32 and AMP
   (autocast + GradScaler): the losses must stay finite;
3. inference (batch 1) and training-step speed of VFNet, Detectron2's FCOS and RetinaNet
   (R-50-FPN, random weights, score threshold 0), fp32 and AMP; VFNet's head channels-last
   against NCHW under AMP;
4. the JSON report (--json) and a Markdown summary (printed; --markdown), with the GPU, the
   torch / CUDA versions, VFNet / FCOS against the targets (<= 1.10 inference, <= 1.20 training
   step) and the paper's 19.4 images/s (VFNet R-50, V100).

    python tools/gpu_check.py                                  # on a GPU
    python tools/gpu_check.py --device cpu --json /tmp/x.json  # dry run: tiny sizes, 2 iterations

Exit status 1 when a check failed (the report is written all the same).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.gpu_check import SECTIONS, run_gpu_check  # noqa: E402


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: a dry run of the logic")
    p.add_argument("--json", help="write the report here (default on cuda: docs/benchmark_gpu.json; on cpu: none)")
    p.add_argument("--markdown", metavar="PATH", help="also write the Markdown summary to PATH")
    p.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="inputs (default 800 1333; cpu 64 96)")
    p.add_argument("--batch", type=int, default=2, help="training batch")
    p.add_argument("--train-iters", type=int, help="iterations of the training check (default 50; cpu 2)")
    p.add_argument("--iters", type=int, help="timed iterations per speed measurement (default 20; cpu 2)")
    p.add_argument("--warmup", type=int, help="untimed iterations before them (default 5; cpu 1)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's; cpu 1)")
    p.add_argument("--skip", action="append", choices=SECTIONS, help="skip a section (repeatable)")
    p.add_argument("--budget-s", type=float, default=420, help="start no section after this many seconds")
    args = p.parse_args(argv)
    if args.json is None and args.device == "cuda":
        args.json = os.path.join(ROOT, "docs", "benchmark_gpu.json")
    return args


def main(argv=None):
    report = run_gpu_check(parse_args(argv))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
