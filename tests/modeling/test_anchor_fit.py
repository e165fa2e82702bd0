"""The fit of training boxes to the finest level's grid (vfnet/modeling/anchor_fit.py), by hand."""
import numpy as np
import pytest

from vfnet.modeling.anchor_fit import anchor_fit_warning, resized_box_sides, suggested_input_scale


def test_resized_box_sides_by_hand():
    """A 100 x 200 image (h, w) resized to short edge 50: x0.5, a 20 x 80 box's side sqrt(1600) =
    40 becomes 20; with the long side capped at 80: x0.4, 16. A 300 x 150 image to short edge
    600 (max 1333): x4, its 10 x 10 box 40."""
    wh = np.array([[20.0, 80.0], [10.0, 10.0]])
    hw = np.array([[100, 200], [300, 150]])
    assert resized_box_sides(wh, hw, 50, 1000) == pytest.approx([20.0, 50 / 150 * 10])
    assert resized_box_sides(wh[:1], hw[:1], 50, 80) == pytest.approx([16.0])
    assert resized_box_sides(wh[1:], hw[1:], 600, 1333) == pytest.approx([40.0])


def test_suggested_input_scale_brings_the_quarter_quantile_to_1_5_strides():
    """Sides 8 (x50) and 12 (x50): the 25% quantile is 8, and 1.5 x 8 px / 8 = 1.5x; sides 4 and 8:
    3x; boxes already at 12 px or more: 1x."""
    sides = np.repeat([8.0, 12.0], 50)
    assert suggested_input_scale(np.repeat([4.0, 8.0], 50), 8) == pytest.approx(3.0)
    assert suggested_input_scale(sides, 8) == pytest.approx(1.5)
    assert suggested_input_scale(np.full(10, 30.0), 8) == 1.0


def test_warning_names_the_share_the_keys_and_the_sizes():
    """60 boxes of 9 px and 40 of 40 px: 60% under 1.5 x 8 = 12 px; the 25% quantile is 9, so
    x12/9 = 1.33: 96 -> 128 and 128 -> 171 -> 192 (multiples of 32)."""
    sides = np.array([9.0] * 60 + [40.0] * 40)
    message = anchor_fit_warning(sides, 8, (96, 128))
    assert "60% of the 100 training boxes are under 12 px" in message
    assert "resize to 96, max 128" in message
    assert "MODEL.VFNET.ATSS.ANCHOR_SCALE does not change that" in message
    assert "about 1.3x: INPUT.MIN_SIZE_TRAIN (128,), MAX_SIZE_TRAIN 192, MIN_SIZE_TEST 128, MAX_SIZE_TEST 192" in message


def test_no_warning_when_the_boxes_fit():
    """25% under the limit is not more than the 25% allowed; no boxes, no warning; the same tiny
    boxes against a stride of 4 (limit 6 px) fit."""
    sides = np.array([9.0] * 25 + [40.0] * 75)
    assert anchor_fit_warning(sides, 8, (96, 128)) is None
    assert anchor_fit_warning(np.zeros(0), 8, (96, 128)) is None
    assert anchor_fit_warning(np.full(100, 9.0), 4, (96, 128)) is None
