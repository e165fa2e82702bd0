"""
Strided convolutions whose inputs narrower than their stride are convolved in float32 under CPU
autocast, where oneDNN's bf16 convolution computes a wrong weight gradient for them.

oneDNN's bf16 backward-weights kernel (``jit_bf16:avx512_core_bf16`` in oneDNN 3.12, torch
2.14; measured on an AMD EPYC, Zen 4) never writes the gradient of the kernel columns that read
only padding when the input is narrower than the stride (a 3x3 conv of stride 2 and padding 1 on
a map one column wide: kernel columns 0 and 2; 5x5 of stride 2, 3x3 of stride 3 likewise): they
hold whatever the memory held (often zeros in a fresh process; stale values, NaN or 1e29, in the
workers of DistributedDataParallel). Stride 1, float32, and inputs at least as wide as the
stride (or only as high) are right. In an FPN it hits P6 and P7, the only strided convs whose
inputs can be one column wide: P7 on batches padded to 32 or 64 px of width, P6 to 32.
"""
import torch
from torch import Tensor, nn


class NarrowInputConv2d(nn.Conv2d):
    """
    nn.Conv2d (same parameters, state dict and float32 results) that, under CPU autocast,
    convolves an input narrower than its stride in float32 (the output too); any other input as
    nn.Conv2d does.
    """

    def _conv_forward(self, input: Tensor, weight: Tensor, bias) -> Tensor:
        if (
            torch.is_autocast_enabled("cpu") and input.device.type == "cpu"
            and input.shape[-1] < self.stride[1]
        ):  # fmt: skip
            dtype = torch.promote_types(input.dtype, weight.dtype)
            with torch.autocast("cpu", enabled=False):
                return super()._conv_forward(input.to(dtype), weight, bias)
        return super()._conv_forward(input, weight, bias)


def convolve_narrow_inputs_in_float32(module: nn.Module) -> nn.Module:
    """
    Make every nn.Conv2d of `module` (exactly that class, as the FPN top blocks' P6 and P7) with
    a stride above 1 in width a :class:`NarrowInputConv2d` in place: the same parameters, another
    class. Returns `module`.
    """
    for m in module.modules():
        if type(m) is nn.Conv2d and m.stride[1] > 1:
            m.__class__ = NarrowInputConv2d
    return module
