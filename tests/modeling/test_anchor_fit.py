"""The fit of training boxes to the ATSS anchors (vfnet/modeling/anchor_fit.py), worked by hand."""
import numpy as np
import pytest

from vfnet.modeling.anchor_fit import anchor_fit_warning, resized_box_sides, suggested_anchor_scale


def test_resized_box_sides_by_hand():
    """A 100 x 200 image (h, w) resized to short edge 50: x0.5, a 20 x 80 box's side sqrt(1600) =
    40 becomes 20; with the long side capped at 80: x0.4, 16. A 300 x 150 image to short edge
    600 (max 1333): x4, its 10 x 10 box 40."""
    wh = np.array([[20.0, 80.0], [10.0, 10.0]])
    hw = np.array([[100, 200], [300, 150]])
    assert resized_box_sides(wh, hw, 50, 1000) == pytest.approx([20.0, 50 / 150 * 10])
    assert resized_box_sides(wh[:1], hw[:1], 50, 80) == pytest.approx([16.0])
    assert resized_box_sides(wh[1:], hw[1:], 600, 1333) == pytest.approx([40.0])


@pytest.mark.parametrize("median, scale", [(9.0, 4), (13.0, 6), (16.5, 8), (7.0, 3), (5.0, 2), (2.0, 2)])
def test_suggested_anchor_scale(median, scale):
    """The largest measured scale whose P3 anchor (scale x 8 px) is at most 4 x the boxes'
    median side: 4 x 9 = 36 >= 32 (scale 4), < 48; 4 x 13 = 52 >= 48 (6); 4 x 5 = 20 < 24 (2,
    the smallest measured)."""
    sides = np.full(11, median)
    assert suggested_anchor_scale(sides, 8) == scale


def test_warning_names_the_share_the_key_and_the_value():
    """60 boxes of side 9 and 40 of side 40 against the default anchor, 64 px on P3: 60% are
    under 16 px; the median of those small ones is 9: ANCHOR_SCALE 4 is suggested."""
    sides = np.array([9.0] * 60 + [40.0] * 40)
    message = anchor_fit_warning(sides, 8, 8, (96, 128))
    assert "60% of the 100 training boxes are smaller than 16 px" in message
    assert "MODEL.VFNET.ATSS.ANCHOR_SCALE 8 x stride 8" in message
    assert "MODEL.VFNET.ATSS.ANCHOR_SCALE 4 (smallest anchor 32 px)" in message
    assert "resize to 96, max 128" in message


def test_no_warning_when_the_boxes_fit():
    """25% under the limit is not more than the 25% allowed; no boxes, no warning."""
    sides = np.array([9.0] * 25 + [40.0] * 75)
    assert anchor_fit_warning(sides, 8, 8, (96, 128)) is None
    assert anchor_fit_warning(np.zeros(0), 8, 8, (96, 128)) is None
    # The same boxes against a smaller anchor (32 px: limit 8 px) fit.
    assert anchor_fit_warning(np.array([9.0] * 100), 4, 8, (96, 128)) is None
