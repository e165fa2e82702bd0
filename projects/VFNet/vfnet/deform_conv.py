"""
A deformable convolution layer whose one weight tensor runs on Detectron2's CUDA kernel,
torchvision's `deform_conv2d`, or bilinear sampling plus one matrix product (the fastest on CPU).
"""
import math
from typing import Optional
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

DEFORM_CONV_IMPLS = ("auto", "detectron2", "torchvision", "sampling")


def deform_conv2d_by_sampling(
    x: Tensor,
    offset: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    padding: int = 1,
    mask: Optional[Tensor] = None,
) -> Tensor:
    """
    Deformable convolution (stride 1, dilation 1, one offset group) computed as bilinear sampling
    of the k x k displaced points with `grid_sample` followed by one matrix product. Same result
    as `torchvision.ops.deform_conv2d` (points outside the map read zeros), in less time on CPU,
    forward and backward.

    Args:
        x: (N, C, H, W) input.
        offset: (N, 2 * k * k, H, W) offsets (dy, dx) of the k x k kernel points, row-major.
        weight: (O, C, k, k) kernel.
        bias: optional (O,).
        padding: zero padding of the regular grid (the output has the input's size when
            padding == (k - 1) / 2).
        mask: optional (N, k * k, H, W) modulation of the sampled values (DCNv2).

    Returns:
        (N, O, H, W).
    """
    n, c, h, w = x.shape
    out_channels, _, k, _ = weight.shape
    offset = offset.view(n, k * k, 2, h, w).to(x.dtype)
    kernel = torch.arange(k, dtype=x.dtype, device=x.device) - padding
    py = (
        torch.arange(h, dtype=x.dtype, device=x.device).view(1, 1, h, 1)
        + kernel.repeat_interleave(k).view(1, k * k, 1, 1)
        + offset[:, :, 0]
    )
    px = (
        torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, 1, w)
        + kernel.repeat(k).view(1, k * k, 1, 1)
        + offset[:, :, 1]
    )
    # Pixel p sits at (2p + 1) / size - 1 in grid_sample's coordinates (align_corners=False).
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    columns = F.grid_sample(
        x, grid.view(n, k * k * h, w, 2), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (N, C, k * k * H, W)
    columns = columns.view(n, c, k * k, h * w)
    if mask is not None:
        columns = columns * mask.view(n, 1, k * k, h * w).to(columns.dtype)
    out = torch.matmul(weight.reshape(out_channels, -1).to(columns.dtype), columns.view(n, -1, h * w))
    out = out.view(n, out_channels, h, w)
    return out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype)


class DeformConv2d(nn.Module):
    """
    Deformable convolution (stride 1), optionally modulated (DCNv2).

    `impl` chooses the kernel: "detectron2" (its CUDA kernel; on CPU it runs forward only),
    "torchvision", "sampling" (:func:`deform_conv2d_by_sampling`), or "auto": Detectron2's on
    CUDA tensors, "sampling" on CPU.
    Offsets use the (dy, dx) layout shared by both kernels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        padding: int = 1,
        bias: bool = False,
        impl: str = "auto",
    ):
        super().__init__()
        if impl not in DEFORM_CONV_IMPLS:
            raise ValueError(f"Unknown deformable conv impl '{impl}': expected one of {DEFORM_CONV_IMPLS}.")
        self.padding = padding
        self.impl = impl
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def _impl(self, x: Tensor) -> str:
        if self.impl != "auto":
            return self.impl
        return "detectron2" if x.is_cuda else "sampling"

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor = None) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W) input.
            offset: (N, 2 * k * k, H, W) sampling offsets.
            mask: optional (N, k * k, H, W) modulation in [0, 1] (DCNv2).

        Returns:
            (N, C_out, H, W).
        """
        impl = self._impl(x)
        if impl == "sampling":
            return deform_conv2d_by_sampling(x, offset, self.weight, self.bias, self.padding, mask)
        if impl == "torchvision":
            return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=mask)
        from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv

        # Detectron2's kernel is not autocast-aware: run it in the weight's dtype.
        x, offset = x.to(self.weight.dtype), offset.to(self.weight.dtype)
        mask = None if mask is None else mask.to(self.weight.dtype)
        if mask is not None:
            return modulated_deform_conv(
                x, offset, mask, self.weight, self.bias, 1, self.padding, 1, 1, 1
            )
        out = deform_conv(x, offset, self.weight, 1, self.padding, 1, 1, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, bias={self.bias is not None}, impl={self.impl}"
