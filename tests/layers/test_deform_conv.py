"""The deformable convolution kernels agree with torchvision's, values and gradients."""
import functools

import pytest
import torch
from torchvision.ops import deform_conv2d

from vfnet.layers.deform_conv import DeformConv2d, deform_conv2d_by_gather, deform_conv2d_by_sampling

# The CPU kernels of this project; the gather kernel also in chunks of a few locations, so that
# chunk borders fall inside images and between the images of the batch.
KERNELS = {
    "sampling": deform_conv2d_by_sampling,
    "gather": deform_conv2d_by_gather,
    "gather-chunked": functools.partial(deform_conv2d_by_gather, chunk_bytes=3000),
}


def inputs(dtype, n=2, c=5, h=7, w=6, o=4, k=3, offset_scale=2.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=g, dtype=dtype, requires_grad=True)
    # Offsets large enough that many points fall between pixels and some outside the map.
    offset = (torch.randn(n, 2 * k * k, h, w, generator=g, dtype=dtype) * offset_scale).requires_grad_()
    weight = torch.randn(o, c, k, k, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(o, generator=g, dtype=dtype, requires_grad=True)
    mask = torch.rand(n, k * k, h, w, generator=g, dtype=dtype, requires_grad=True)
    return x, offset, weight, bias, mask


def value_and_grads(fn, tensors):
    for t in tensors:
        t.grad = None
    out = fn(*tensors)
    # A non-uniform upstream gradient, so that every path of the backward is exercised.
    (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    return out.detach(), [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("modulated", [False, True])
def test_kernel_equals_torchvision_in_float64(kernel, modulated):
    x, offset, weight, bias, mask = inputs(torch.float64)
    tensors = [x, offset, weight, bias] + ([mask] if modulated else [])

    def ours(x, offset, weight, bias, mask=None):
        return KERNELS[kernel](x, offset, weight, bias, padding=1, mask=mask)

    def reference(x, offset, weight, bias, mask=None):
        return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    out, grads = value_and_grads(ours, tensors)
    ref_out, ref_grads = value_and_grads(reference, tensors)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("trained", ["x", "offset", "weight", "bias", "mask"])
def test_gradient_of_one_input_alone_equals_torchvision(kernel, trained):
    """Only one input needs a gradient (a frozen layer, fixed offsets, ...): the backward computes
    that one, equal to torchvision's."""
    tensors = dict(zip(["x", "offset", "weight", "bias", "mask"], inputs(torch.float64)))
    for name, t in tensors.items():
        t.requires_grad_(name == trained)

    def grad(fn):
        out = fn(*tensors.values())
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        g = tensors[trained].grad.clone()
        tensors[trained].grad = None
        return g

    ours = grad(lambda x, offset, weight, bias, mask: KERNELS[kernel](x, offset, weight, bias, padding=1, mask=mask))
    reference = grad(lambda x, offset, weight, bias, mask: deform_conv2d(x, offset, weight, bias, padding=1, mask=mask))
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_equals_torchvision_in_float32_to_1e5_relative(kernel):
    x, offset, weight, bias, _ = inputs(torch.float32, n=2, c=32, h=20, w=24, o=16)
    out, grads = value_and_grads(lambda *t: KERNELS[kernel](*t, padding=1), [x, offset, weight, bias])
    ref, ref_grads = value_and_grads(lambda *t: deform_conv2d(*t, padding=1), [x, offset, weight, bias])
    scale = ref.abs().max()
    assert (out - ref).abs().max() / scale < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() / r.abs().max() < 1e-5


@pytest.mark.parametrize("kernel", KERNELS)
def test_zero_offsets_give_the_plain_convolution(kernel):
    x, offset, weight, bias, _ = inputs(torch.float64)
    out = KERNELS[kernel](x, torch.zeros_like(offset), weight, bias, padding=1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, bias, padding=1))


@pytest.mark.parametrize("kernel", KERNELS)
def test_integer_offset_reads_the_shifted_pixel(kernel):
    # A 1x1 kernel moved by (dy, dx) = (1, -2) reads x[y + 1, x - 2], zero outside the map.
    x = torch.arange(30, dtype=torch.float64).view(1, 1, 5, 6)
    offset = torch.tensor([1.0, -2.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 5, 6)
    out = KERNELS[kernel](x, offset, torch.ones(1, 1, 1, 1, dtype=torch.float64), padding=0)
    expected = torch.zeros(5, 6, dtype=torch.float64)
    expected[:4, 2:] = x[0, 0, 1:, :4]
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize("impl", ["auto", "torchvision", "gather", "sampling", "detectron2"])
def test_layer_impls_share_one_weight_and_agree_on_cpu(impl):
    if impl == "detectron2":
        pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
    torch.manual_seed(0)
    layer = DeformConv2d(5, 4, impl=impl)
    x, offset, _, _, _ = inputs(torch.float32)
    reference = deform_conv2d(x, offset, layer.weight, padding=1)
    torch.testing.assert_close(layer(x, offset), reference, rtol=1e-5, atol=1e-5)


def test_unknown_impl_is_refused_by_name():
    with pytest.raises(ValueError, match="'cudnn'"):
        DeformConv2d(4, 4, impl="cudnn")


@pytest.mark.parametrize("kernel", KERNELS)
def test_kernel_runs_under_bfloat16_autocast(kernel):
    x, offset, weight, bias, _ = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = KERNELS[kernel](x, offset, weight, bias)
    reference = deform_conv2d(x, offset, weight, bias, padding=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.1)


def test_auto_resolves_to_the_gather_kernel_on_cpu_and_detectron2_on_cuda():
    layer = DeformConv2d(4, 4)
    assert layer.resolved_impl(torch.device("cpu")) == "gather"
    assert layer.resolved_impl(torch.device("cuda")) == "detectron2"
    assert DeformConv2d(4, 4, impl="sampling").resolved_impl(torch.device("cuda")) == "sampling"


def test_bilinear_corners_weights_sum_to_one_inside_and_drop_outside_pixels():
    from vfnet.layers.deform_conv import bilinear_corners

    # Image 1 of 2, maps of 3 x 4: a point between pixels, one on a pixel, one half outside
    # (left of column 0) and one wholly outside.
    py = torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.25, 2.0, 1.0, 5.0]])
    px = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.5, 3.0, -0.5, 1.0]])
    indices, weights = bilinear_corners(py, px, 3, 4)
    rows = indices.view(2, 4, 4)[1] - 12  # image 1 owns rows 12 ... 23
    w = weights.view(2, 4, 4)[1]
    # (0.25, 1.5): pixels (0, 1), (0, 2), (1, 1), (1, 2) with weights .75*.5, .75*.5, .25*.5, .25*.5
    assert rows[0].tolist() == [1, 2, 5, 6]
    torch.testing.assert_close(w[0], torch.tensor([0.375, 0.375, 0.125, 0.125]))
    # (2, 3): the pixel itself with weight 1, the others outside the map.
    assert rows[1][0].item() == 2 * 4 + 3
    torch.testing.assert_close(w[1], torch.tensor([1.0, 0.0, 0.0, 0.0]))
    # (1, -0.5): half of pixel (1, 0); the corner at column -1 weighs 0.
    assert rows[2][1].item() == 4
    torch.testing.assert_close(w[2], torch.tensor([0.0, 0.5, 0.0, 0.0]))
    # (5, 1): below the map, nothing.
    assert w[3].abs().sum() == 0
    assert (indices >= 0).all() and (indices < 24).all()
