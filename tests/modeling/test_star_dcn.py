"""
Tests of vfnet.modeling.star_dcn.star_dcn_offsets: hand-worked offsets, the gradient multiplier and the
end-to-end semantics with torchvision.ops.deform_conv2d.
"""
import pytest
import torch
from torchvision.ops import deform_conv2d

from vfnet.modeling.star_dcn import star_dcn_offsets

# Regular 3x3 grid positions (dy, dx) of kernel points k = 0..8 (row-major).
GRID = [(-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 0), (0, 1), (1, -1), (1, 0), (1, 1)]

# Channel c of the offsets, as (index into (l, t, r, b), sign) or None where the star point does
# not depend on the distances. Point k samples (dy, dx) = (-t,-l), (-t,0), (-t,r), (0,-l), (0,0),
# (0,r), (b,-l), (b,0), (b,r); channel 2k is dy, 2k+1 is dx.
L, T, R, B = 0, 1, 2, 3
CHANNEL_SOURCE = [
    (T, -1), (L, -1),  # k0 (-t, -l)
    (T, -1), None,  # k1 (-t, 0)
    (T, -1), (R, +1),  # k2 (-t, r)
    None, (L, -1),  # k3 (0, -l)
    None, None,  # k4 (0, 0)
    None, (R, +1),  # k5 (0, r)
    (B, +1), (L, -1),  # k6 (b, -l)
    (B, +1), None,  # k7 (b, 0)
    (B, +1), (R, +1),  # k8 (b, r)
]


def test_hand_worked_offsets():
    # stride 8, (l, t, r, b) = (16, 8, 24, 32) px -> (2, 1, 3, 4) cells.
    # star points (dy, dx): (-1,-2) (-1,0) (-1,3) (0,-2) (0,0) (0,3) (4,-2) (4,0) (4,3)
    # minus the grid:       (-1,-1) (-1,0) (-1,1) (0,-1) (0,0) (0,1) (1,-1) (1,0) (1,1)
    expected = [
        0, -1,  # k0
        0, 0,  # k1
        0, 2,  # k2
        0, -1,  # k3
        0, 0,  # k4
        0, 2,  # k5
        3, -1,  # k6
        3, 0,  # k7
        3, 2,  # k8
    ]
    distances = torch.tensor([16.0, 8.0, 24.0, 32.0]).view(1, 4, 1, 1)
    offsets = star_dcn_offsets(distances, gradient_mul=0.1, stride=8)
    assert offsets.shape == (1, 18, 1, 1)
    assert offsets.dtype == torch.float32
    # (1 - g) * d + g * d rounds in float32 (e.g. 0.9 * 24 + 0.1 * 24 = 23.999998): near-exact
    torch.testing.assert_close(
        offsets.flatten(), torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5
    )
    # with gradient_mul = 1 (or 0) no rounding occurs: exact
    assert star_dcn_offsets(distances, gradient_mul=1.0, stride=8).flatten().tolist() == expected
    assert star_dcn_offsets(distances, gradient_mul=0.0, stride=8).flatten().tolist() == expected


def test_zero_distances_give_minus_grid():
    # a point-sized box collapses all nine samples onto the location: offsets = -grid
    offsets = star_dcn_offsets(torch.zeros(1, 4, 1, 1), gradient_mul=0.5, stride=16)
    expected = [-v for k in range(9) for v in GRID[k]]
    assert offsets.flatten().tolist() == expected


def test_per_location_layout_and_batch():
    g = torch.Generator().manual_seed(0)
    distances = torch.rand(2, 4, 3, 5, generator=g, dtype=torch.float64) * 40
    stride = 4
    offsets = star_dcn_offsets(distances, gradient_mul=0.1, stride=stride)
    assert offsets.shape == (2, 18, 3, 5)
    assert offsets.dtype == torch.float64
    for c, src in enumerate(CHANNEL_SOURCE):
        k, axis = divmod(c, 2)
        expected = -GRID[k][axis] * torch.ones(2, 3, 5, dtype=torch.float64)
        if src is not None:
            idx, sign = src
            expected = expected + sign * distances[:, idx] / stride
        torch.testing.assert_close(offsets[:, c], expected)


@pytest.mark.parametrize("gradient_mul", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("stride", [8, 32])
def test_gradient_multiplier(gradient_mul, stride):
    g = torch.Generator().manual_seed(1)
    base = torch.rand(1, 4, 2, 3, generator=g, dtype=torch.float64) * 50 + 1
    upstream = torch.randn(1, 18, 2, 3, generator=g, dtype=torch.float64)

    d = base.clone().requires_grad_(True)
    offsets = star_dcn_offsets(d, gradient_mul=gradient_mul, stride=stride)
    (offsets * upstream).sum().backward()

    # value does not depend on gradient_mul
    ref_values = star_dcn_offsets(base, gradient_mul=1.0, stride=stride)
    torch.testing.assert_close(offsets.detach(), ref_values)

    # closed-form gradient: d offset_c / d distance_src = sign * gradient_mul / stride
    expected = torch.zeros_like(base)
    for c, src in enumerate(CHANNEL_SOURCE):
        if src is not None:
            idx, sign = src
            expected[:, idx] += sign * upstream[:, c] * gradient_mul / stride
    torch.testing.assert_close(d.grad, expected)

    # and relative to gradient_mul = 1 it is scaled by gradient_mul
    d1 = base.clone().requires_grad_(True)
    (star_dcn_offsets(d1, gradient_mul=1.0, stride=stride) * upstream).sum().backward()
    torch.testing.assert_close(d.grad, d1.grad * gradient_mul)


def _coordinate_map(height, width):
    ys = torch.arange(height, dtype=torch.float32).view(height, 1).expand(height, width)
    xs = torch.arange(width, dtype=torch.float32).view(1, width).expand(height, width)
    return torch.stack([ys, xs]).unsqueeze(0)  # (1, 2, H, W): channel 0 = y, channel 1 = x


def _one_hot_kernel(k):
    weight = torch.zeros(2, 2, 3, 3)
    i, j = divmod(k, 3)
    weight[0, 0, i, j] = 1.0  # output 0 reads the y channel at kernel point k
    weight[1, 1, i, j] = 1.0  # output 1 reads the x channel at kernel point k
    return weight


def _star_point(k, l, t, r, b):
    dy = (-t, 0, b)[k // 3]
    dx = (-l, 0, r)[k % 3]
    return dy, dx


def test_deform_conv2d_samples_star_points_constant_box():
    height, width, stride = 16, 16, 8
    l, t, r, b = 2, 1, 3, 4  # cells
    inp = _coordinate_map(height, width)
    distances = torch.tensor([l, t, r, b], dtype=torch.float32).mul(stride).view(1, 4, 1, 1)
    distances = distances.expand(1, 4, height, width).contiguous()
    offsets = star_dcn_offsets(distances, gradient_mul=0.1, stride=stride)
    # locations whose star points are all inside the map
    valid_y = range(t, height - b)
    valid_x = range(l, width - r)
    for k in range(9):
        out = deform_conv2d(inp, offsets, _one_hot_kernel(k), padding=1)
        dy, dx = _star_point(k, l, t, r, b)
        for y in valid_y:
            for x in valid_x:
                assert abs(out[0, 0, y, x].item() - (y + dy)) < 1e-4, (k, y, x)
                assert abs(out[0, 1, y, x].item() - (x + dx)) < 1e-4, (k, y, x)


def test_deform_conv2d_samples_star_points_per_location_boxes():
    height, width, stride = 12, 14, 4
    g = torch.Generator().manual_seed(2)
    cells = torch.randint(0, 4, (1, 4, height, width), generator=g)
    distances = (cells * stride).float()
    offsets = star_dcn_offsets(distances, gradient_mul=0.1, stride=stride)
    inp = _coordinate_map(height, width)
    outs = [deform_conv2d(inp, offsets, _one_hot_kernel(k), padding=1) for k in range(9)]
    checked = 0
    for y in range(height):
        for x in range(width):
            l, t, r, b = cells[0, :, y, x].tolist()
            if y - t < 0 or y + b > height - 1 or x - l < 0 or x + r > width - 1:
                continue
            for k in range(9):
                dy, dx = _star_point(k, l, t, r, b)
                assert abs(outs[k][0, 0, y, x].item() - (y + dy)) < 1e-4
                assert abs(outs[k][0, 1, y, x].item() - (x + dx)) < 1e-4
            checked += 1
    assert checked > 20


def test_deform_conv2d_full_kernel_sums_star_points():
    # with an all-ones kernel the output sums the nine star samples:
    # y: 3 (y - t) + 3 y + 3 (y + b);  x: 3 (x - l) + 3 x + 3 (x + r)
    height, width, stride = 10, 10, 16
    l, t, r, b = 1, 2, 2, 3
    distances = torch.tensor([l, t, r, b], dtype=torch.float32).mul(stride).view(1, 4, 1, 1)
    distances = distances.expand(1, 4, height, width).contiguous()
    offsets = star_dcn_offsets(distances, gradient_mul=0.1, stride=stride)
    weight = torch.zeros(2, 2, 3, 3)
    weight[0, 0] = 1.0
    weight[1, 1] = 1.0
    out = deform_conv2d(_coordinate_map(height, width), offsets, weight, padding=1)
    for y in range(t, height - b):
        for x in range(l, width - r):
            assert abs(out[0, 0, y, x].item() - (9 * y + 3 * (b - t))) < 1e-3
            assert abs(out[0, 1, y, x].item() - (9 * x + 3 * (r - l))) < 1e-3
