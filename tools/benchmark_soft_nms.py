#!/usr/bin/env python
"""
Class-wise soft-NMS (vfnet.layers.batched_soft_nms, linear and gaussian) against torchvision's
hard batched_nms on CPU, on VFNet-X-like candidates: 1000 per level x 5 levels above the 0.05
score threshold, 80 classes, IoU threshold 0.65. Prints a table with the CPU model.

    python tools/benchmark_soft_nms.py [--iters 5] [--threads 1] [--sizes 1000 5000]
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.benchmark_soft_nms import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
