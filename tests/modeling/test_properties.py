"""Property-based tests (hypothesis) of the pure VFNet modules."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torchvision.ops import box_iou

from vfnet.modeling.atss import ATSSMatcher
from vfnet.modeling.box_coding import aligned_iou, distances_to_boxes
from vfnet.modeling.losses import iou_weighted_giou_loss, varifocal_loss
from vfnet.modeling.star_dcn import star_dcn_offsets

SETTINGS = settings(max_examples=50, deadline=None)

logit = st.floats(min_value=-50.0, max_value=50.0, allow_nan=False, width=32)
target = st.one_of(
    st.just(0.0), st.just(1.0), st.floats(min_value=0.0, max_value=1.0, allow_nan=False, width=32)
)
coord = st.floats(min_value=-200.0, max_value=1000.0, allow_nan=False, width=32)
size = st.floats(min_value=0.0, max_value=500.0, allow_nan=False, width=32)


@st.composite
def boxes(draw, n, min_size=0.0):
    sizes = st.floats(min_value=min_size, max_value=500.0, allow_nan=False, width=32)
    out = []
    for _ in range(n):
        x, y = draw(coord), draw(coord)
        out.append([x, y, x + draw(sizes), y + draw(sizes)])
    return torch.tensor(out, dtype=torch.float32)


@SETTINGS
@given(
    pairs=st.lists(st.tuples(logit, target), min_size=1, max_size=40),
    iou_weighted=st.booleans(),
    reduction=st.sampled_from(["sum", "mean"]),
)
def test_varifocal_finite_nonnegative(pairs, iou_weighted, reduction):
    logits = torch.tensor([p[0] for p in pairs], dtype=torch.float32, requires_grad=True)
    targets = torch.tensor([p[1] for p in pairs], dtype=torch.float32)
    per_elem = varifocal_loss(logits, targets, iou_weighted=iou_weighted, reduction="none")
    assert torch.isfinite(per_elem).all()
    assert (per_elem >= 0).all()
    loss = varifocal_loss(logits, targets, iou_weighted=iou_weighted, reduction=reduction)
    assert torch.isfinite(loss) and loss.item() >= 0
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # the gradient pushes p towards q: for negatives (q = 0) it is >= 0, and for q = 1 <= 0
    neg = targets == 0
    assert (logits.grad[neg] >= 0).all()
    assert (logits.grad[targets == 1] <= 0).all()


@SETTINGS
@given(st.integers(min_value=1, max_value=12).flatmap(lambda n: st.tuples(boxes(n), boxes(n))))
def test_aligned_iou_in_unit_interval(pair):
    b1, b2 = pair
    iou = aligned_iou(b1, b2)
    assert iou.shape == (b1.shape[0],)
    assert torch.isfinite(iou).all()
    assert (iou >= 0).all() and (iou <= 1).all()
    torch.testing.assert_close(iou, aligned_iou(b2, b1))
    # a box with positive area has IoU 1 with itself
    self_iou = aligned_iou(b1, b1)
    area = (b1[:, 2] - b1[:, 0]) * (b1[:, 3] - b1[:, 1])
    assert torch.allclose(self_iou[area > 1e-3], torch.ones(1))


@SETTINGS
@given(st.integers(min_value=1, max_value=12).flatmap(lambda n: st.tuples(boxes(n), boxes(n))))
def test_giou_loss_finite_with_finite_grads(pair):
    pred, tgt = pair
    pred = pred.clone().requires_grad_(True)
    loss, weights = iou_weighted_giou_loss(pred, tgt)
    assert torch.isfinite(loss) and loss.item() >= 0
    assert torch.isfinite(weights).all()
    assert (weights >= 1e-6).all() and (weights <= 1).all()
    assert not weights.requires_grad
    loss.backward()
    assert torch.isfinite(pred.grad).all()


@st.composite
def atss_scene(draw):
    num_levels = draw(st.integers(min_value=1, max_value=3))
    base = draw(st.sampled_from([4, 8]))
    strides = [base * 2**i for i in range(num_levels)]
    img_h = draw(st.integers(min_value=16, max_value=96))
    img_w = draw(st.integers(min_value=16, max_value=96))
    anchors, nums = [], []
    for s in strides:
        h, w = -(-img_h // s), -(-img_w // s)
        for y in range(h):
            for x in range(w):
                anchors.append([x * s - 4 * s, y * s - 4 * s, x * s + 4 * s, y * s + 4 * s])
        nums.append(h * w)
    num_boxes = draw(st.integers(min_value=0, max_value=6))
    gt = []
    pos = st.floats(min_value=-10.0, max_value=100.0, allow_nan=False, width=32)
    extent = st.floats(min_value=0.5, max_value=120.0, allow_nan=False, width=32)
    for _ in range(num_boxes):
        x, y = draw(pos), draw(pos)
        gt.append([x, y, x + draw(extent), y + draw(extent)])
    topk = draw(st.integers(min_value=2, max_value=9))
    return (
        torch.tensor(anchors, dtype=torch.float32),
        nums,
        torch.tensor(gt, dtype=torch.float32).view(-1, 4),
        topk,
    )


def _well_posed(anchors, nums, box, topk):
    """
    False when the ATSS decision for `box` hinges on float rounding: a distance tie at a level's
    top-k boundary, all candidate IoUs equal (threshold = mean + 0 = every IoU, decided by the
    rounding of the mean), or an IoU within 1e-5 of the threshold.
    """
    a = anchors.double()
    b = box.double()
    centers = (a[:, :2] + a[:, 2:]) / 2
    dist = ((centers - (b[:2] + b[2:]) / 2) ** 2).sum(dim=1).sqrt()
    candidates, start = [], 0
    for n in nums:
        d, order = dist[start : start + n].sort(stable=True)
        k = min(topk, n)
        if k < n and d[k] - d[k - 1] < 1e-3:
            return False
        candidates.append(order[:k] + start)
        start += n
    cand = torch.cat(candidates)
    ious = box_iou(a[cand], b[None])[:, 0]
    if ious.max() - ious.min() < 1e-6:
        return False
    thr = ious.mean() + ious.std()
    return bool((ious - thr).abs().min() > 1e-5)


@SETTINGS
@given(atss_scene())
def test_atss_invariants(scene):
    anchors, nums, gt, topk = scene
    matched = ATSSMatcher(topk=topk)(anchors, nums, gt)
    assert matched.dtype == torch.int64
    assert matched.shape == (anchors.shape[0],)
    assert ((matched >= -1) & (matched < gt.shape[0])).all()
    if gt.shape[0] == 0:
        assert (matched == -1).all()
        return
    pos = matched >= 0
    centers = (anchors[pos, :2] + anchors[pos, 2:]) / 2
    assigned = gt[matched[pos]]
    margin = torch.cat([centers - assigned[:, :2], assigned[:, 2:] - centers], dim=1)
    assert (margin.min(dim=1).values > 0.01).all()
    # a box gets at most topk positives per level
    start = 0
    for n in nums:
        level = matched[start : start + n]
        for g in range(gt.shape[0]):
            assert int((level == g).sum()) <= min(topk, n)
        start += n
    # removing every box but one can only add positives to that box (no competition left);
    # checked where the box's candidate set and threshold are numerically unambiguous
    for g in range(gt.shape[0]):
        if not _well_posed(anchors, nums, gt[g], topk):
            continue
        alone = ATSSMatcher(topk=topk)(anchors, nums, gt[g : g + 1])
        assert ((matched == g) <= (alone == 0)).all()


@SETTINGS
@given(
    dist=st.lists(
        st.floats(min_value=0.125, max_value=2000.0, allow_nan=False, width=32),
        min_size=4,
        max_size=4,
    ),
    gradient_mul=st.floats(min_value=0.0, max_value=1.0, allow_nan=False),
    stride=st.sampled_from([4, 8, 16, 32, 64, 128]),
)
def test_star_offsets_finite(dist, gradient_mul, stride):
    d = torch.tensor(dist, dtype=torch.float32).view(1, 4, 1, 1).repeat(2, 1, 3, 2)
    d.requires_grad_(True)
    offsets = star_dcn_offsets(d, gradient_mul=gradient_mul, stride=stride)
    assert offsets.shape == (2, 18, 3, 2)
    assert torch.isfinite(offsets).all()
    # the center kernel point (k = 4, channels 8 and 9) never moves
    assert (offsets[:, 8:10] == 0).all()
    # sampled positions (offset + grid) reproduce the box in cells, up to rounding
    l, t, r, b = (v / stride for v in dist)
    pts = offsets[0, :, 0, 0].view(9, 2) + torch.tensor(
        [[i, j] for i in (-1, 0, 1) for j in (-1, 0, 1)], dtype=torch.float32
    )
    assert np.isclose(pts[0, 0].item(), -t, rtol=1e-5, atol=1e-5)
    assert np.isclose(pts[0, 1].item(), -l, rtol=1e-5, atol=1e-5)
    assert np.isclose(pts[8, 0].item(), b, rtol=1e-5, atol=1e-5)
    assert np.isclose(pts[8, 1].item(), r, rtol=1e-5, atol=1e-5)
    offsets.sum().backward()
    assert torch.isfinite(d.grad).all()


@SETTINGS
@given(
    st.lists(st.floats(min_value=0.0, max_value=500.0, allow_nan=False, width=32), min_size=4, max_size=4),
    st.tuples(coord, coord),
)
def test_distances_to_boxes_valid_for_nonnegative_distances(dist, point):
    boxes_ = distances_to_boxes(torch.tensor([point]), torch.tensor([dist]))
    assert (boxes_[:, 2] >= boxes_[:, 0]).all() and (boxes_[:, 3] >= boxes_[:, 1]).all()
