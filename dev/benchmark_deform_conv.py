"""
The deformable-conv kernels of vfnet.layers against torchvision's on CPU, forward and backward
(what tools/benchmark_deform_conv.py runs). No Detectron2.
"""
import time
import torch
from torchvision.ops import deform_conv2d

from vfnet.layers.deform_conv import deform_conv2d_by_gather, deform_conv2d_by_sampling

SHAPES = [(1, 256, 100, 152), (1, 256, 50, 76), (2, 256, 64, 96), (8, 128, 20, 24)]
# P3 and P4 of an 800x1216 image; P3 of a training batch of 2 at 512x768; the shapes demo
KERNELS = {"gather": deform_conv2d_by_gather, "sampling": deform_conv2d_by_sampling}


def fwd_bwd(fn, tensors, iters):
    """Median forward and backward seconds over `iters` runs, and the output and gradients."""
    fwd, bwd = [], []
    for _ in range(iters):
        for t in tensors:
            t.grad = None
        start = time.perf_counter()
        out = fn(*tensors)
        mid = time.perf_counter()
        out.square().sum().backward()
        fwd.append(mid - start)
        bwd.append(time.perf_counter() - mid)
    median = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return median(fwd), median(bwd), [out.detach()] + [t.grad.clone() for t in tensors]


def run_kernel_benchmark(iters):
    """Print the table: each kernel on each of SHAPES, median of `iters` runs."""
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| N x C x H x W | kernel | fwd / bwd ms | speed-up over torchvision fwd / bwd | max rel. diff |")
    print("|---|---|---|---|---|")
    for n, c, h, w in SHAPES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
        offset = (torch.randn(n, 18, h, w, generator=g) * 3).requires_grad_()
        weight = (torch.randn(c, c, 3, 3, generator=g) * 0.01).requires_grad_()
        tv = fwd_bwd(lambda *t: deform_conv2d(*t, padding=1), [x, offset, weight], iters)
        print(f"| {n}x{c}x{h}x{w} | torchvision | {tv[0] * 1e3:.0f} / {tv[1] * 1e3:.0f} | 1.0x / 1.0x | 0 |")
        for name, kernel in KERNELS.items():
            ours = fwd_bwd(lambda *t: kernel(*t, padding=1), [x, offset, weight], iters)
            diff = max(float((a - b).abs().max() / b.abs().max()) for a, b in zip(ours[2], tv[2]))
            print(f"| | {name} | {ours[0] * 1e3:.0f} / {ours[1] * 1e3:.0f} | "
                  f"{tv[0] / ours[0]:.1f}x / {tv[1] / ours[1]:.1f}x | {diff:.1e} |")
