#!/usr/bin/env python
"""
Deformable convolution kernels on CPU: torchvision's `deform_conv2d` against this project's
`deform_conv2d_by_sampling`, forward and backward, with their largest relative differences.

    python tools/benchmark_deform_conv.py [--iters 3]
"""
import argparse
import time
import torch
from torchvision.ops import deform_conv2d

from vfnet.deform_conv import deform_conv2d_by_sampling

SHAPES = [(1, 256, 100, 152), (1, 256, 50, 76), (8, 128, 20, 24)]  # P3 and P4 of 800x1216; demo


def fwd_bwd(fn, tensors, iters):
    """Best forward and backward seconds over `iters` runs, and the output and gradients."""
    best_f = best_b = float("inf")
    for _ in range(iters):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        out = fn(*tensors)
        mid = time.perf_counter()
        out.square().sum().backward()
        best_f, best_b = min(best_f, mid - start), min(best_b, time.perf_counter() - mid)
    return best_f, best_b, [out.detach()] + [t.grad.clone() for t in tensors]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N x C x H x W | torchvision fwd / bwd ms | sampling fwd / bwd ms | speed-up fwd / bwd | max rel. diff |")
    print("|---|---|---|---|---|")
    for n, c, h, w in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
        offset = (torch.randn(n, 18, h, w, generator=g) * 3).requires_grad_()
        weight = (torch.randn(c, c, 3, 3, generator=g) * 0.01).requires_grad_()
        tv = fwd_bwd(lambda *t: deform_conv2d(*t, padding=1), [x, offset, weight], args.iters)
        ours = fwd_bwd(lambda *t: deform_conv2d_by_sampling(*t, padding=1), [x, offset, weight], args.iters)
        diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours[2], tv[2]))
        print(f"| {n}x{c}x{h}x{w} | {tv[0] * 1e3:.0f} / {tv[1] * 1e3:.0f} | {ours[0] * 1e3:.0f} / "
              f"{ours[1] * 1e3:.0f} | {tv[0] / ours[0]:.1f}x / {tv[1] / ours[1]:.1f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
