"""
A deformable convolution layer whose one weight tensor runs on Detectron2's CUDA kernel or on
torchvision's `deform_conv2d`, whichever fits the device.
"""
import math
import torch
from torch import Tensor, nn
from torchvision.ops import deform_conv2d

DEFORM_CONV_IMPLS = ("auto", "detectron2", "torchvision")


class DeformConv2d(nn.Module):
    """
    Deformable convolution (stride 1), optionally modulated (DCNv2).

    `impl` chooses the kernel: "detectron2" (its CUDA kernel; on CPU it runs forward only),
    "torchvision", or "auto" (Detectron2's on CUDA tensors, torchvision's otherwise).
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

    def _use_detectron2(self, x: Tensor) -> bool:
        return self.impl == "detectron2" or (self.impl == "auto" and x.is_cuda)

    def forward(self, x: Tensor, offset: Tensor, mask: Tensor = None) -> Tensor:
        """
        Args:
            x: (N, C_in, H, W) input.
            offset: (N, 2 * k * k, H, W) sampling offsets.
            mask: optional (N, k * k, H, W) modulation in [0, 1] (DCNv2).

        Returns:
            (N, C_out, H, W).
        """
        if not self._use_detectron2(x):
            return deform_conv2d(x, offset, self.weight, self.bias, padding=self.padding, mask=mask)
        from detectron2.layers.deform_conv import deform_conv, modulated_deform_conv

        if mask is not None:
            return modulated_deform_conv(
                x, offset, mask, self.weight, self.bias, 1, self.padding, 1, 1, 1
            )
        out = deform_conv(x, offset, self.weight, 1, self.padding, 1, 1, 1)
        return out if self.bias is None else out + self.bias.view(1, -1, 1, 1)

    def extra_repr(self) -> str:
        o, i, k, _ = self.weight.shape
        return f"{i}, {o}, kernel_size={k}, padding={self.padding}, bias={self.bias is not None}, impl={self.impl}"
