#!/usr/bin/env python
"""
Deformable convolution kernels on CPU: torchvision's `deform_conv2d` against this project's
`deform_conv2d_by_gather` (the CPU default) and `deform_conv2d_by_sampling` (the ONNX-exportable
one), forward and backward, with their largest relative differences to torchvision's.

    python tools/benchmark_deform_conv.py [--iters 3]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # dev/

from dev.benchmark_deform_conv import run_kernel_benchmark  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    run_kernel_benchmark(args.iters)


if __name__ == "__main__":
    main()
