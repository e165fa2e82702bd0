"""
ATSS over each image's own extent (vfnet.modeling.atss: size_divisor, inside_padded_image),
against hand-worked cases.
"""
import math

import numpy as np
import torch

from vfnet.modeling.atss import ATSSMatcher, inside_padded_image


def grid(stride, h, w, side):
    """(h*w, 4) square anchors of `side` centered on (x*stride, y*stride), row-major."""
    ys, xs = torch.meshgrid(torch.arange(h) * stride, torch.arange(w) * stride, indexing="ij")
    c = torch.stack([xs.flatten(), ys.flatten()], dim=1).float()
    return torch.cat([c - side / 2, c + side / 2], dim=1)


def test_valid_locations_are_mmdetections_ceil_of_the_padded_shape():
    # Image 40 x 70 padded to 64 x 96; the batch is 128 x 256 (strides 8, 16, 128).
    # MMDetection: valid (h, w) = min(ceil(pad / stride), grid): 8 x 12, 4 x 6, 1 x 1.
    for stride, (gh, gw), (vh, vw) in ((8, (16, 32), (8, 12)), (16, (8, 16), (4, 6)), (128, (1, 2), (1, 1))):
        valid = inside_padded_image(grid(stride, gh, gw, 4 * stride), (40, 70), 32).view(gh, gw)
        expected = torch.zeros(gh, gw, dtype=torch.bool)
        expected[:vh, :vw] = True
        assert torch.equal(valid, expected), stride
    # Already a multiple of 32: no padding of its own.
    assert int(inside_padded_image(grid(8, 16, 32, 32), (64, 96), 32).sum()) == 8 * 12


def test_candidates_beyond_the_image_extent_are_left_out_hand_worked():
    """
    One level of stride 8 on a 64 x 64 batch, anchors of side 16; the image is 32 x 32 (its own
    extent: locations 0, 8, 16, 24); box (20, 20, 36, 36), top-4.

    Whole batch: the 4 nearest locations (24|32, 24|32) all have IoU 144/368 with the box, so
    mean + std = 144/368 and all four are positive. Own extent: (32, *) and (*, 32) are out; the
    candidates are (24,24) IoU 144/368, (16,24) and (24,16) 48/464, (16,16) 16/496; the threshold
    mean + std is about 0.317, and only (24,24) passes.
    """
    anchors, nums = grid(8, 8, 8, 16), [64]
    box = torch.tensor([[20.0, 20.0, 36.0, 36.0]])
    at = lambda x, y: (y // 8) * 8 + x // 8  # noqa: E731
    whole = ATSSMatcher(topk=4, size_divisor=0)(anchors, nums, box, (32, 32))
    assert set(torch.nonzero(whole >= 0).flatten().tolist()) == {at(24, 24), at(32, 24), at(24, 32), at(32, 32)}
    own = ATSSMatcher(topk=4, size_divisor=32)(anchors, nums, box, (32, 32))
    assert torch.nonzero(own >= 0).flatten().tolist() == [at(24, 24)]
    ious = np.array([144 / 368, 48 / 464, 48 / 464, 16 / 496])
    thr = ious.mean() + ious.std(ddof=1)
    assert math.isclose(thr, 0.31698, abs_tol=1e-4) and (ious >= thr).tolist() == [True, False, False, False]
    # Without an image size every anchor takes part, as with size_divisor 0.
    assert torch.equal(ATSSMatcher(topk=4)(anchors, nums, box), whole)
