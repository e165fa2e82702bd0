"""Tests of vfnet.modeling.box_coding: point-distance coding and aligned IoU, on hand-worked numbers."""
import math

import pytest
import torch
from torchvision.ops import box_iou

from vfnet.modeling.box_coding import aligned_iou, boxes_to_distances, distances_to_boxes


def test_distances_to_boxes_known_numbers():
    points = torch.tensor([[10.0, 20.0], [0.0, 0.0], [5.5, -3.0]])
    distances = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0], [0.5, 1.0, 2.5, 7.0]])
    # (x - l, y - t, x + r, y + b)
    expected = torch.tensor(
        [[9.0, 18.0, 13.0, 24.0], [0.0, 0.0, 0.0, 0.0], [5.0, -4.0, 8.0, 4.0]]
    )
    assert torch.equal(distances_to_boxes(points, distances), expected)


def test_boxes_to_distances_known_numbers():
    points = torch.tensor([[10.0, 20.0], [50.0, 50.0]])
    boxes = torch.tensor([[9.0, 18.0, 13.0, 24.0], [0.0, 0.0, 40.0, 100.0]])
    # (x - x1, y - y1, x2 - x, y2 - y); the second point lies right of its box: r < 0.
    expected = torch.tensor([[1.0, 2.0, 3.0, 4.0], [50.0, 50.0, -10.0, 50.0]])
    assert torch.equal(boxes_to_distances(points, boxes), expected)


def test_coding_batched_shapes():
    points = torch.zeros(2, 3, 2)
    distances = torch.ones(2, 3, 4)
    boxes = distances_to_boxes(points, distances)
    assert boxes.shape == (2, 3, 4)
    assert torch.equal(boxes[0, 0], torch.tensor([-1.0, -1.0, 1.0, 1.0]))
    assert boxes_to_distances(points, boxes).shape == (2, 3, 4)


def test_coding_round_trip():
    g = torch.Generator().manual_seed(0)
    points = torch.rand(5, 7, 2, generator=g, dtype=torch.float64) * 100
    distances = torch.rand(5, 7, 4, generator=g, dtype=torch.float64) * 50
    boxes = distances_to_boxes(points, distances)
    torch.testing.assert_close(boxes_to_distances(points, boxes), distances)
    torch.testing.assert_close(distances_to_boxes(points, boxes_to_distances(points, boxes)), boxes)


def test_aligned_iou_hand_worked():
    boxes1 = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],  # identical -> 1
            [0.0, 0.0, 10.0, 10.0],  # disjoint -> 0
            [0.0, 0.0, 10.0, 10.0],  # touching edges only -> 0
            [0.0, 0.0, 10.0, 10.0],  # contains a 2x5 box -> 10 / 100
            [0.0, 0.0, 4.0, 6.0],  # partial: inter 2x3=6, union 24+24-6=42 -> 1/7
            [0.0, 0.0, 2.0, 2.0],  # partial: inter 1, union 4+4-1=7 -> 1/7
        ]
    )
    boxes2 = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [20.0, 20.0, 30.0, 30.0],
            [10.0, 0.0, 20.0, 10.0],
            [3.0, 4.0, 5.0, 9.0],
            [2.0, 3.0, 6.0, 9.0],
            [1.0, 1.0, 3.0, 3.0],
        ]
    )
    expected = torch.tensor([1.0, 0.0, 0.0, 0.1, 1 / 7, 1 / 7])
    torch.testing.assert_close(aligned_iou(boxes1, boxes2), expected)
    # IoU is symmetric
    torch.testing.assert_close(aligned_iou(boxes2, boxes1), expected)


def test_aligned_iou_degenerate_boxes_give_zero_not_nan():
    boxes1 = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],  # point vs point at the same place
            [5.0, 5.0, 5.0, 5.0],  # point inside a real box
            [0.0, 0.0, 0.0, 10.0],  # zero-width line vs itself
            [3.0, 3.0, 1.0, 1.0],  # inverted box vs inverted box
        ]
    )
    boxes2 = torch.tensor(
        [
            [5.0, 5.0, 5.0, 5.0],
            [0.0, 0.0, 10.0, 10.0],
            [0.0, 0.0, 0.0, 10.0],
            [3.0, 3.0, 1.0, 1.0],
        ]
    )
    iou = aligned_iou(boxes1, boxes2)
    assert not torch.isnan(iou).any()
    assert torch.equal(iou, torch.zeros(4))


def test_aligned_iou_empty():
    assert aligned_iou(torch.zeros(0, 4), torch.zeros(0, 4)).shape == (0,)


def _random_boxes(n, generator, scale=100.0):
    xy = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale
    wh = torch.rand(n, 2, generator=generator, dtype=torch.float64) * scale / 2 + 0.5
    return torch.cat([xy, xy + wh], dim=1)


def test_aligned_iou_matches_torchvision_diagonal():
    g = torch.Generator().manual_seed(1)
    boxes1 = _random_boxes(200, g)
    boxes2 = _random_boxes(200, g)
    # make some pairs overlap heavily
    boxes2[:50] = boxes1[:50] + torch.rand(50, 4, generator=g, dtype=torch.float64) * 5
    expected = box_iou(boxes1, boxes2).diagonal()
    actual = aligned_iou(boxes1, boxes2)
    assert (expected > 0).sum() >= 50
    torch.testing.assert_close(actual, expected)
    actual32 = aligned_iou(boxes1.float(), boxes2.float())
    torch.testing.assert_close(actual32, expected.float(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("shift", [0.0, 1.0, 2.5, 10.0])
def test_aligned_iou_shifted_square(shift):
    # 10x10 square vs itself shifted right by s: inter 10*(10-s), union 200 - inter.
    boxes1 = torch.tensor([[0.0, 0.0, 10.0, 10.0]], dtype=torch.float64)
    boxes2 = boxes1 + torch.tensor([shift, 0.0, shift, 0.0], dtype=torch.float64)
    inter = 10 * max(10 - shift, 0)
    expected = inter / (200 - inter)
    assert math.isclose(aligned_iou(boxes1, boxes2).item(), expected, rel_tol=1e-12, abs_tol=1e-12)
