"""
Star-shaped sampling offsets of VarifocalNet's deformable convolutions: the 3x3 kernel samples
the location itself, the midpoints of the box's four sides and its four corners.
Pure torch (no Detectron2).
"""
import torch
from torch import Tensor


def star_dcn_offsets(distances: Tensor, gradient_mul: float, stride: int) -> Tensor:
    """
    Args:
        distances: (N, 4, H, W) predicted distances (l, t, r, b) in input-image pixels.
        gradient_mul: share of the gradient that flows from the offsets back to `distances`.
        stride: stride of the feature map, to express the distances in feature-map cells.

    Returns:
        (N, 18, H, W) offsets of a 3x3 deformable convolution in the (dy, dx) layout of
        `torchvision.ops.deform_conv2d`: kernel point k (row-major) moves from its regular grid
        position to (-t, -l), (-t, 0), (-t, r), (0, -l), (0, 0), (0, r), (b, -l), (b, 0), (b, r).
    """
    d = (1 - gradient_mul) * distances.detach() + gradient_mul * distances
    l, t, r, b = (d / stride).unbind(dim=1)
    zero = torch.zeros_like(l)
    dy = torch.stack([-t, -t, -t, zero, zero, zero, b, b, b], dim=1)
    dx = torch.stack([-l, zero, r, -l, zero, r, -l, zero, r], dim=1)
    grid = torch.arange(-1, 2, dtype=d.dtype, device=d.device)
    grid_dy = grid.repeat_interleave(3).view(1, 9, 1, 1)
    grid_dx = grid.repeat(3).view(1, 9, 1, 1)
    return torch.stack([dy - grid_dy, dx - grid_dx], dim=2).flatten(1, 2)
