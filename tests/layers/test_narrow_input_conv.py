"""
vfnet.layers.narrow_input_conv: under CPU bf16 autocast, the weight gradient of a strided conv
whose input is narrower than its stride (P7 of an FPN on images 64 px wide, P6 and P7 on 32 px)
is right, whatever the freed memory holds; in float32, and on wider inputs, it is nn.Conv2d.
"""
import pytest
import torch
from torch import nn

from vfnet.layers import NarrowInputConv2d, convolve_narrow_inputs_in_float32

# (N, C, H, W) inputs of P6/P7's 3x3 stride-2 convs narrower than the stride: P7's of a batch
# padded to 64 px of width (P6 is 2 x 1), P6's and P7's of one padded to 32.
NARROW = [(2, 64, 2, 1), (1, 64, 1, 1), (1, 16, 4, 1)]


def dirty_heap(nbytes=1 << 16, count=64):
    """Free memory that holds bf16 3.4e38 (0x7F7F) everywhere, as a heap that has been used."""
    chunks = [torch.full((nbytes // 4,), 0x7F7F7F7F, dtype=torch.int32) for _ in range(count)]
    del chunks


def gradients(conv, x, autocast):
    """The output and the weight's gradient of one step of `conv` on `x` (loss: sum of squares)."""
    conv.zero_grad()
    dirty_heap()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = conv(x)
    y.float().square().sum().backward()
    return y, conv.weight.grad.clone()


def conv_pair(channels):
    """An nn.Conv2d of P6/P7 (3x3, stride 2, padding 1) and a NarrowInputConv2d copy of it."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)
    narrow = NarrowInputConv2d(channels, channels, 3, stride=2, padding=1)
    narrow.load_state_dict(conv.state_dict())
    return conv, narrow


@pytest.mark.parametrize("shape", NARROW, ids=lambda s: "x".join(map(str, s)))
def test_the_weight_gradient_of_an_input_narrower_than_the_stride_is_float32s_under_bf16(shape):
    # (oneDNN's bf16 kernel leaves kernel columns 0 and 2, which read only padding, unwritten:
    # there nn.Conv2d's gradient is what the freed memory held, 2e38 or -inf, on AVX-512 BF16.)
    conv, narrow = conv_pair(shape[1])
    x = torch.randn(shape)
    y, grad = gradients(narrow, x, autocast=True)
    y_float32, grad_float32 = gradients(conv, x, autocast=False)
    assert grad[..., 1].any() and not grad[..., [0, 2]].any()  # the columns that read pixels
    assert torch.equal(grad, grad_float32)
    assert y.dtype == torch.float32 and torch.equal(y, y_float32)


def test_float32_and_inputs_as_wide_as_the_stride_are_nn_conv2ds():
    conv, narrow = conv_pair(16)
    # Float32 on narrow and wide inputs; bf16 on a wide one and on one as short as the stride.
    cases = [((2, 16, 2, 1), False), ((2, 16, 4, 2), False), ((2, 16, 4, 2), True),
             ((2, 16, 1, 3), True)]  # fmt: skip
    for shape, autocast in cases:
        x = torch.randn(shape)
        y, grad = gradients(narrow, x, autocast)
        y_conv, grad_conv = gradients(conv, x, autocast)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        assert torch.equal(y, y_conv) and torch.equal(grad, grad_conv), (shape, autocast)


def test_only_plain_strided_conv2ds_are_converted_in_place():
    from detectron2.layers import Conv2d

    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, stride=(2, 1), padding=1), Conv2d(8, 8, 3, stride=2, padding=1),
    )  # fmt: skip
    state = model.state_dict()
    assert convolve_narrow_inputs_in_float32(model) is model
    assert [type(m) for m in model] == [NarrowInputConv2d, nn.Conv2d, nn.Conv2d, Conv2d]
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
