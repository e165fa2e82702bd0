"""
One deformable-conv kernel on offsets holding NaN, +inf, -inf, 1e30 and a mix of them, forward
and backward, for tests/modeling/test_numerics.py (in a child process: a kernel that crashes on them
kills this process, not pytest). Prints one JSON line per case: the largest difference from the
reference, where a kernel point with a non-finite offset reads zero (it is given offset 0 and
modulation 0, through torchvision), and whether the input gradient is finite.

    python tests/scripts/nonfinite_offsets.py KERNEL
"""
import json
import sys

import torch
from torchvision.ops import deform_conv2d

from vfnet.layers import DeformConv2d
from vfnet.modeling.backbone import AnyDeviceModulatedDeformConv


def cases(shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(shape, generator=g) * 2
    special = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf"), "1e30": 1e30}
    where = torch.rand(shape, generator=g) < 0.3
    for name, value in special.items():
        yield name, torch.where(where, value, base)
    pick = torch.randint(0, 4, shape, generator=g)
    mixed = base.clone()
    for i, value in enumerate(special.values()):
        mixed = torch.where(where & (pick == i), value, mixed)
    yield "mixed", mixed


def reference(x, offset, weight, mask):
    """Each kernel point with a non-finite (dy, dx) contributes zero: modulation 0."""
    points = offset.unflatten(1, (-1, 2))
    bad = ~torch.isfinite(points).all(dim=2)  # (N, k * k, H, W)
    # 1e30 is finite but lies outside the map: torchvision reads it as zero (in the reference
    # too, since it stays).
    offset = torch.where(bad.unsqueeze(2), 0.0, points).flatten(1, 2)
    mask = torch.where(bad, 0.0, mask)
    return deform_conv2d(x, offset, weight, padding=1, mask=mask)


def main(kernel):
    torch.manual_seed(0)
    n, c, h, w = 2, 8, 12, 16
    x = torch.randn(n, c, h, w)
    if kernel == "backbone":
        layer = AnyDeviceModulatedDeformConv(c, c, 3, padding=1, bias=False)
    else:
        layer = DeformConv2d(c, c, 3, padding=1, impl=kernel)
    weight = layer.weight.detach()
    for name, offset in cases((n, 18, h, w)):
        # Detectron2's CPU kernel has no modulation: a mask of ones there.
        mask = torch.rand(n, 9, h, w) if kernel != "detectron2" else torch.ones(n, 9, h, w)
        xg = x.clone().requires_grad_(kernel != "detectron2")
        with torch.no_grad() if kernel == "detectron2" else torch.enable_grad():
            out = layer(xg, offset, None if kernel == "detectron2" else mask)
        grad_finite = None
        if xg.requires_grad:
            out.sum().backward()
            grad_finite = bool(torch.isfinite(xg.grad).all())
        expected = reference(x, offset, weight, mask)
        print(json.dumps({
            "case": name,
            "max_abs_diff": float((out.detach() - expected).abs().max()),
            "output_finite": bool(torch.isfinite(out).all()),
            "grad_finite": grad_finite,
        }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
