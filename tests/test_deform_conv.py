"""The deformable convolution kernels agree with torchvision's, values and gradients."""
import pytest
import torch
from torchvision.ops import deform_conv2d

from vfnet.deform_conv import DeformConv2d, deform_conv2d_by_sampling


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


@pytest.mark.parametrize("modulated", [False, True])
def test_sampling_equals_torchvision_in_float64(modulated):
    x, offset, weight, bias, mask = inputs(torch.float64)
    tensors = [x, offset, weight, bias] + ([mask] if modulated else [])

    def ours(x, offset, weight, bias, mask=None):
        return deform_conv2d_by_sampling(x, offset, weight, bias, padding=1, mask=mask)

    def reference(x, offset, weight, bias, mask=None):
        return deform_conv2d(x, offset, weight, bias, padding=1, mask=mask)

    out, grads = value_and_grads(ours, tensors)
    ref_out, ref_grads = value_and_grads(reference, tensors)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-10)


def test_sampling_equals_torchvision_in_float32_to_1e5_relative():
    x, offset, weight, bias, _ = inputs(torch.float32, n=1, c=32, h=20, w=24, o=16)
    out, grads = value_and_grads(lambda *t: deform_conv2d_by_sampling(*t, padding=1), [x, offset, weight, bias])
    ref, ref_grads = value_and_grads(lambda *t: deform_conv2d(*t, padding=1), [x, offset, weight, bias])
    scale = ref.abs().max()
    assert (out - ref).abs().max() / scale < 1e-5
    for g, r in zip(grads, ref_grads):
        assert (g - r).abs().max() / r.abs().max() < 1e-5


def test_zero_offsets_give_the_plain_convolution():
    x, offset, weight, bias, _ = inputs(torch.float64)
    out = deform_conv2d_by_sampling(x, torch.zeros_like(offset), weight, bias, padding=1)
    torch.testing.assert_close(out, torch.nn.functional.conv2d(x, weight, bias, padding=1))


def test_integer_offset_reads_the_shifted_pixel():
    # A 1x1 kernel moved by (dy, dx) = (1, -2) reads x[y + 1, x - 2], zero outside the map.
    x = torch.arange(30, dtype=torch.float64).view(1, 1, 5, 6)
    offset = torch.tensor([1.0, -2.0], dtype=torch.float64).view(1, 2, 1, 1).expand(1, 2, 5, 6)
    out = deform_conv2d_by_sampling(x, offset, torch.ones(1, 1, 1, 1, dtype=torch.float64), padding=0)
    expected = torch.zeros(5, 6, dtype=torch.float64)
    expected[:4, 2:] = x[0, 0, 1:, :4]
    torch.testing.assert_close(out[0, 0], expected)


@pytest.mark.parametrize("impl", ["auto", "torchvision", "sampling", "detectron2"])
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


def test_sampling_runs_under_bfloat16_autocast():
    x, offset, weight, bias, _ = inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d_by_sampling(x, offset, weight, bias)
    reference = deform_conv2d(x, offset, weight, bias, padding=1)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.1)
