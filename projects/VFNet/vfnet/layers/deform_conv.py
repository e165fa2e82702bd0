"""
A deformable convolution layer whose one weight tensor runs on Detectron2's CUDA kernel,
torchvision's `deform_conv2d`, a bilinear gather plus a 1x1 convolution (the fastest on CPU), or
`grid_sample` plus a matrix product (exportable to ONNX). Imports Detectron2 only to run its
kernel.
"""
import math
from typing import Optional, Tuple
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torchvision.ops import deform_conv2d

DEFORM_CONV_IMPLS = ("auto", "detectron2", "torchvision", "gather", "sampling")


# Where finite_offsets puts the points of non-finite offsets: above and left of any map of fewer
# than 32000 rows and columns (every output location, kernel point and stride), a value that
# float16 and bfloat16 hold exactly, and the same for all image sizes (an exported graph bakes it).
OUTSIDE_OFFSET = -(2.0**15)


def finite_offsets(offset: Tensor) -> Tensor:
    """
    The offsets with every kernel point whose (dy, dx) is not finite (NaN, inf) moved outside
    the map: such a point reads zero, as any point outside the map does, in every kernel.
    (torchvision's CPU kernel crashes the process on NaN offsets, and the gather and sampling
    kernels would otherwise return NaN where torchvision returns 0 for infinite ones.)

    Args:
        offset: (N, 2 * k * k * G, Ho, Wo) offsets (dy, dx) of the k x k kernel points of G
            offset groups at each output location.

    Returns:
        Offsets of the same shape and dtype; gradients flow to the finite ones.
    """
    n, _, h, w = offset.shape
    points = offset.reshape(n, -1, 2, h, w)
    finite = torch.isfinite(points).all(dim=2, keepdim=True)
    return torch.where(finite, points, OUTSIDE_OFFSET).reshape(offset.shape)


def deform_sampling_points(offset: Tensor, kernel_size: int, padding: int) -> Tuple[Tensor, Tensor]:
    """
    Where a deformable convolution (stride 1, dilation 1, one offset group) samples its input.

    Args:
        offset: (N, 2 * k * k, H, W) offsets (dy, dx) of the k x k kernel points, row-major.
        kernel_size: k.
        padding: zero padding of the regular grid.

    Returns:
        py, px: (N, k * k, H, W) row and column, in input pixels, of kernel point j of the
            output location (y, x): (y + j // k - padding + dy, x + j % k - padding + dx), in
            float32 or wider.
    """
    n, _, h, w = offset.shape
    k = kernel_size
    # In float32 (float64 for float64 offsets) whatever the offsets' dtype: bfloat16 holds the
    # integers of a row or column index exactly only up to 256.
    offset = offset.to(torch.promote_types(offset.dtype, torch.float32)).reshape(n, k * k, 2, h, w)
    kernel = torch.arange(k, dtype=offset.dtype, device=offset.device) - padding
    py = (
        torch.arange(h, dtype=offset.dtype, device=offset.device).view(1, 1, h, 1)
        + kernel.repeat_interleave(k).view(1, k * k, 1, 1)
        + offset[:, :, 0]
    )
    px = (
        torch.arange(w, dtype=offset.dtype, device=offset.device).view(1, 1, 1, w)
        + kernel.repeat(k).view(1, k * k, 1, 1)
        + offset[:, :, 1]
    )
    return py, px


def bilinear_corners(py: Tensor, px: Tensor, height: int, width: int) -> Tuple[Tensor, Tensor]:
    """
    The four pixels around each sampling point and their bilinear weights, with zeros outside
    the map (the convention of `torchvision.ops.deform_conv2d` and `grid_sample`'s "zeros").

    Args:
        py, px: (N, ...) rows and columns of the points in maps of `height` x `width`; image n of
            the batch owns the rows n * height * width ... (n + 1) * height * width - 1 of the
            flattened maps.

    Returns:
        indices: (M, 4) int64 rows of the (N * height * width, C) flattened maps, M = py.numel().
        weights: (M, 4) bilinear weights (differentiable with respect to py and px); a corner
            outside the map has weight 0 (and a clamped index).
    """
    y0, x0 = py.detach().floor(), px.detach().floor()
    ly, lx = (py - y0).unsqueeze(-1), (px - x0).unsqueeze(-1)
    step_y = torch.tensor([0, 0, 1, 1], dtype=py.dtype, device=py.device)
    step_x = torch.tensor([0, 1, 0, 1], dtype=px.dtype, device=px.device)
    ys, xs = y0.unsqueeze(-1) + step_y, x0.unsqueeze(-1) + step_x
    inside = (ys >= 0) & (ys <= height - 1) & (xs >= 0) & (xs <= width - 1)
    weights = torch.where(step_y.bool(), ly, 1 - ly) * torch.where(step_x.bool(), lx, 1 - lx) * inside
    image = torch.arange(py.shape[0], device=py.device).view(-1, *([1] * py.dim())) * (height * width)
    indices = image + ys.clamp(0, height - 1).long() * width + xs.clamp(0, width - 1).long()
    return indices.reshape(-1, 4), weights.reshape(-1, 4)


def deform_conv2d_by_gather(
    x: Tensor, offset: Tensor, weight: Tensor, bias: Optional[Tensor] = None, padding: int = 1,
    mask: Optional[Tensor] = None, chunk_bytes: int = 8 * 2**20,
) -> Tensor:
    """
    Deformable convolution (stride 1, dilation 1, one offset group) as a weighted gather of
    channel vectors followed by a 1x1 convolution: each of the k x k points of an output location
    is the bilinear mix of four rows of the channels-last input (`F.embedding_bag` with the
    bilinear weights), and the k * k * C sampled values of a location meet the kernel in one 1x1
    convolution (channels-last, so that it runs on oneDNN). Locations are processed in chunks
    whose sampled values take at most `chunk_bytes`, which keeps them in cache and out of the
    allocator's fresh-page path. Same result as `torchvision.ops.deform_conv2d`, forward and
    backward, in a fraction of its time on CPU.

    Args and returns: as :func:`deform_conv2d_by_sampling`; the output is channels-last in
    memory.
    """
    n, c, h, w = x.shape
    out_channels, _, k, _ = weight.shape
    kk = k * k
    py, px = deform_sampling_points(finite_offsets(offset), k, padding)
    # Rows ordered (image, y, x, kernel point): the points of a location are adjacent.
    indices, weights = bilinear_corners(py.permute(0, 2, 3, 1), px.permute(0, 2, 3, 1), h, w)
    if mask is not None:
        weights = weights * mask.permute(0, 2, 3, 1).reshape(-1, 1).to(weights.dtype)
    # The bilinear mix in float32 (or wider) when gradients are recorded, under autocast too: in
    # bfloat16 its backward would round the gradient of each corner's weight before the
    # differences of corners that make the offsets' gradient (5x its error on smooth maps), and
    # sum the input's gradient in bfloat16. Without gradients (inference), in the input's dtype.
    mix_dtype = x.dtype
    if torch.is_grad_enabled() and (x.requires_grad or offset.requires_grad):
        mix_dtype = torch.promote_types(x.dtype, torch.float32)
    table = x.permute(0, 2, 3, 1).to(mix_dtype).contiguous().view(n * h * w, c)
    weights = weights.to(mix_dtype)
    kernel = weight.permute(0, 2, 3, 1).reshape(out_channels, kk * c, 1, 1)
    if not torch.is_autocast_enabled(x.device.type):
        # (Under autocast each chunk's convolution casts them, and the chunks' gradients add up
        # in the weight's dtype.)
        kernel, bias = kernel.to(x.dtype), None if bias is None else bias.to(x.dtype)
    step = max(1, chunk_bytes // (kk * c * table.element_size()))
    outs = []
    for start in range(0, n * h * w, step):
        rows = slice(start * kk, min(start + step, n * h * w) * kk)
        columns = F.embedding_bag(indices[rows], table, per_sample_weights=weights[rows], mode="sum")
        # (1, k*k*C, L, 1) channels-last, in the input's dtype
        columns = columns.to(x.dtype).view(1, -1, 1, kk * c).permute(0, 3, 1, 2)
        outs.append(F.conv2d(columns, kernel, bias).view(out_channels, -1).t())  # (L, O)
    return torch.cat(outs).view(n, h, w, out_channels).permute(0, 3, 1, 2)


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
    of the k x k displaced points with `grid_sample` followed by one matrix product: the same
    result as `torchvision.ops.deform_conv2d` (points outside the map read zeros) from operators
    that every exporter knows (ONNX GridSample and MatMul).

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
    py, px = deform_sampling_points(finite_offsets(offset), k, padding)
    # Pixel p sits at (2p + 1) / size - 1 in grid_sample's coordinates (align_corners=False). The
    # grid and the sampling stay in float32 (or wider): in bfloat16 a grid step of 2 / W rounds
    # to a fraction of a pixel.
    grid = torch.stack([(2 * px + 1) / w - 1, (2 * py + 1) / h - 1], dim=-1)
    columns = F.grid_sample(
        x.to(grid.dtype), grid.view(n, k * k * h, w, 2), mode="bilinear", padding_mode="zeros",
        align_corners=False,
    )  # (N, C, k * k * H, W)
    columns = columns.to(x.dtype).view(n, c, k * k, h * w)
    if mask is not None:
        columns = columns * mask.view(n, 1, k * k, h * w).to(columns.dtype)
    out = torch.matmul(weight.reshape(out_channels, -1).to(columns.dtype), columns.view(n, -1, h * w))
    out = out.view(n, out_channels, h, w)
    return out if bias is None else out + bias.view(1, -1, 1, 1).to(out.dtype)


def detectron2_kernel_inputs(
    weight: Tensor, x: Tensor, offset: Tensor, mask: Optional[Tensor] = None
) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
    """
    `x`, `offset` and `mask` as Detectron2's CUDA kernels need them: in the weight's dtype (the
    kernels ignore autocast and read every tensor as one scalar type) and NCHW-contiguous. The
    modulated kernel refuses other inputs (`TORCH_CHECK(input.is_contiguous())`); both read the
    offsets and masks through raw NCHW pointers and write the gradients into
    `zeros_like(input)` and `zeros_like(offset)` as NCHW: wrong for channels-last tensors.
    """
    dtype = weight.dtype
    x, offset = x.to(dtype).contiguous(), offset.to(dtype).contiguous()
    return x, offset, None if mask is None else mask.to(dtype).contiguous()


class DeformConv2d(nn.Module):
    """
    Deformable convolution (stride 1), optionally modulated (DCNv2).

    `impl` chooses the kernel: "detectron2" (its CUDA kernel; on CPU it runs forward only),
    "torchvision", "gather" (:func:`deform_conv2d_by_gather`), "sampling"
    (:func:`deform_conv2d_by_sampling`), or "auto": Detectron2's on CUDA tensors, "gather" on CPU.
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

    def resolved_impl(self, device: torch.device) -> str:
        """The kernel this layer runs on `device`: `impl` with "auto" resolved."""
        if self.impl != "auto":
            return self.impl
        return "detectron2" if torch.device(device).type == "cuda" else "gather"

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor = None) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W) input.
            offset: (N, 2 * k * k, H, W) sampling offsets.
            mask: optional (N, k * k, H, W) modulation in [0, 1] (DCNv2).

        Returns:
            (N, C_out, H, W).
        """
        impl = self.resolved_impl(x.device)
        if impl == "gather":
            return deform_conv2d_by_gather(x, offset, self.weight, self.bias, self.padding, mask)
        if impl == "sampling":
            return deform_conv2d_by_sampling(x, offset, self.weight, self.bias, self.padding, mask)
        # The same result for non-finite offsets as the gather and sampling kernels, which
        # apply finite_offsets themselves.
        offset = finite_offsets(offset)
        if impl == "torchvision":
            # One dtype for all inputs, float32 under autocast (sampling positions included).
            dtype = torch.promote_types(x.dtype, self.weight.dtype)
            mask = None if mask is None else mask.to(dtype)
            return deform_conv2d(
                x.to(dtype), offset.to(dtype), self.weight.to(dtype),
                None if self.bias is None else self.bias.to(dtype), padding=self.padding, mask=mask,
            )
        from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv

        x, offset, mask = detectron2_kernel_inputs(self.weight, x, offset, mask)
        if mask is not None:
            return modulated_deform_conv(
                x, offset, mask, self.weight.contiguous(), self.bias, 1, self.padding, 1, 1, 1
            )
        out = deform_conv(x, offset, self.weight.contiguous(), 1, self.padding, 1, 1, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, bias={self.bias is not None}, impl={self.impl}"
