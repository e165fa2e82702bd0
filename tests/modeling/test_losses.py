"""
Tests of vfnet.modeling.losses against independently written formulas (plain Python floats / float64).

Varifocal loss (VarifocalNet eq. 2, MMDetection's VarifocalLoss):
    q > 0: -w * (q * log p + (1 - q) * log(1 - p)),  w = q (iou_weighted) or 1
    q = 0: -alpha * p**gamma * log(1 - p)
with p = sigmoid(x). Closed-form derivatives w.r.t. the logit x (log p = -softplus(-x),
log(1 - p) = -softplus(x), dp/dx = p (1 - p)):
    q > 0: w * (p - q)
    q = 0: alpha * p**gamma * (gamma * (1 - p) * softplus(x) + p)
"""
import math

import pytest
import torch

from vfnet.modeling.losses import iou_weighted_giou_loss, varifocal_loss

ALPHA, GAMMA = 0.75, 2.0


def _softplus(x):
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x):
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    e = math.exp(x)
    return e / (1.0 + e)


def ref_vfl(x, q, alpha=ALPHA, gamma=GAMMA, iou_weighted=True):
    """(loss, dloss/dx) of one element, in double precision."""
    p = _sigmoid(x)
    if q > 0:
        w = q if iou_weighted else 1.0
        # -(q log p + (1-q) log(1-p)) = q softplus(-x) + (1-q) softplus(x)
        loss = w * (q * _softplus(-x) + (1 - q) * _softplus(x))
        grad = w * (p - q)
    else:
        loss = alpha * p**gamma * _softplus(x)
        grad = alpha * p**gamma * (gamma * (1 - p) * _softplus(x) + p)
    return loss, grad


def ref_vfl_tensor(logits, targets, **kw):
    pairs = [ref_vfl(float(x), float(q), **kw) for x, q in zip(logits.flatten(), targets.flatten())]
    loss = torch.tensor([p[0] for p in pairs], dtype=torch.float64).view(logits.shape)
    grad = torch.tensor([p[1] for p in pairs], dtype=torch.float64).view(logits.shape)
    return loss, grad


def _vfl_and_grad(logits, targets, **kw):
    x = logits.clone().requires_grad_(True)
    loss = varifocal_loss(x, targets, reduction="none", **kw)
    loss.sum().backward()
    return loss.detach(), x.grad


def test_reference_formula_sanity():
    # the reference itself on hand-worked numbers: x = 0 -> p = 1/2
    loss, grad = ref_vfl(0.0, 0.5)
    assert math.isclose(loss, 0.5 * math.log(2))  # -0.5 * (0.5 log .5 + 0.5 log .5)
    assert grad == 0.0
    loss, grad = ref_vfl(0.0, 0.0)
    assert math.isclose(loss, 0.75 * 0.25 * math.log(2))
    # the closed-form derivative agrees with a central finite difference
    for x in (-3.0, -0.2, 0.7, 4.0):
        for q in (0.0, 0.3, 1.0):
            h = 1e-6
            fd = (ref_vfl(x + h, q)[0] - ref_vfl(x - h, q)[0]) / (2 * h)
            assert math.isclose(ref_vfl(x, q)[1], fd, rel_tol=1e-6, abs_tol=1e-8)


@pytest.mark.parametrize("iou_weighted", [True, False])
def test_varifocal_positive_fractional_targets(iou_weighted):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 5, generator=g) * 3
    targets = torch.rand(6, 5, generator=g) * 0.98 + 0.01  # q in (0, 1)
    loss, grad = _vfl_and_grad(logits, targets, iou_weighted=iou_weighted)
    exp_loss, exp_grad = ref_vfl_tensor(logits, targets, iou_weighted=iou_weighted)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-6)


def test_varifocal_iou_weighted_false_differs_by_factor_q():
    logits = torch.tensor([[-1.0, 0.5, 2.0]])
    targets = torch.tensor([[0.2, 0.5, 0.9]])
    weighted = varifocal_loss(logits, targets, reduction="none", iou_weighted=True)
    unweighted = varifocal_loss(logits, targets, reduction="none", iou_weighted=False)
    torch.testing.assert_close(weighted, unweighted * targets)
    # hand value: x=0.5, q=0.5 unweighted -> 0.5 softplus(-0.5) + 0.5 softplus(0.5)
    expected = 0.5 * _softplus(-0.5) + 0.5 * _softplus(0.5)
    assert math.isclose(unweighted[0, 1].item(), expected, rel_tol=1e-6)


def test_varifocal_q_equals_one():
    logits = torch.tensor([-4.0, -1.0, 0.0, 1.0, 4.0])
    targets = torch.ones(5)
    loss, grad = _vfl_and_grad(logits, targets)
    # q = 1: loss = -log p = softplus(-x), grad = p - 1
    expected = torch.tensor([_softplus(-x) for x in logits.tolist()], dtype=torch.float64)
    expected_grad = torch.tensor([_sigmoid(x) - 1 for x in logits.tolist()], dtype=torch.float64)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad.double(), expected_grad, rtol=1e-6, atol=1e-7)
    # unweighted is identical when q = 1
    torch.testing.assert_close(
        varifocal_loss(logits, targets, reduction="none", iou_weighted=False), loss
    )


def test_varifocal_all_negative():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 8, generator=g) * 4
    targets = torch.zeros(4, 8)
    loss, grad = _vfl_and_grad(logits, targets)
    exp_loss, exp_grad = ref_vfl_tensor(logits, targets)
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grad.double(), exp_grad, rtol=1e-5, atol=1e-7)
    # hand value: x = 0 -> 0.75 * 0.25 * log 2
    single = varifocal_loss(torch.zeros(1), torch.zeros(1), reduction="sum")
    assert math.isclose(single.item(), 0.75 * 0.25 * math.log(2), rel_tol=1e-6)
    # iou_weighted does not change negatives
    torch.testing.assert_close(
        varifocal_loss(logits, targets, reduction="none", iou_weighted=False), loss
    )


def test_varifocal_alpha_gamma_parameters():
    logits = torch.tensor([-2.0, 0.3, 1.5])
    targets = torch.tensor([0.0, 0.0, 0.6])
    loss = varifocal_loss(logits, targets, alpha=0.25, gamma=1.5, reduction="none")
    expected = torch.tensor(
        [ref_vfl(x, q, alpha=0.25, gamma=1.5)[0] for x, q in zip(logits.tolist(), targets.tolist())],
        dtype=torch.float64,
    )
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)


def test_varifocal_mixed_and_reductions():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 4, 5, generator=g) * 2
    targets = torch.rand(3, 4, 5, generator=g)
    targets[targets < 0.6] = 0.0  # mixture of negatives and positives
    targets[0, 0, 0] = 1.0
    exp_loss, exp_grad = ref_vfl_tensor(logits, targets)

    none = varifocal_loss(logits, targets, reduction="none")
    assert none.shape == logits.shape
    torch.testing.assert_close(none.double(), exp_loss, rtol=1e-5, atol=1e-7)

    s = varifocal_loss(logits, targets, reduction="sum")
    assert s.dim() == 0
    assert math.isclose(s.item(), exp_loss.sum().item(), rel_tol=1e-5)
    m = varifocal_loss(logits, targets, reduction="mean")
    assert m.dim() == 0
    assert math.isclose(m.item(), exp_loss.mean().item(), rel_tol=1e-5)
    # default reduction is "sum"
    assert math.isclose(varifocal_loss(logits, targets).item(), s.item(), rel_tol=1e-6)

    for reduction, scale in (("sum", 1.0), ("mean", 1.0 / logits.numel())):
        x = logits.clone().requires_grad_(True)
        varifocal_loss(x, targets, reduction=reduction).backward()
        torch.testing.assert_close(x.grad.double(), exp_grad * scale, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["avg", "Sum", "", None])
def test_varifocal_bad_reduction(reduction):
    with pytest.raises(ValueError):
        varifocal_loss(torch.zeros(2, 3), torch.zeros(2, 3), reduction=reduction)


@pytest.mark.parametrize("magnitude", [50.0, 100.0])
def test_varifocal_extreme_logits(magnitude):
    logits = torch.tensor([magnitude, -magnitude] * 4)
    targets = torch.tensor([0.0, 0.0, 1.0, 1.0, 0.5, 0.5, 1e-3, 1e-3])
    x = logits.clone().requires_grad_(True)
    loss = varifocal_loss(x, targets, reduction="none")
    loss.sum().backward()
    assert torch.isfinite(loss).all()
    assert torch.isfinite(x.grad).all()
    exp_loss, exp_grad = ref_vfl_tensor(logits, targets)
    torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), exp_grad, rtol=1e-5, atol=1e-6)
    # a confidently wrong negative (x = +m, q = 0) costs alpha * m
    assert math.isclose(loss[0].item(), 0.75 * magnitude, rel_tol=1e-5)
    # a confidently wrong positive (x = -m, q = 1) costs m
    assert math.isclose(loss[3].item(), magnitude, rel_tol=1e-5)


def test_varifocal_bf16_autocast_cpu():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 10, generator=g) * 3
    targets = torch.rand(64, 10, generator=g)
    targets[targets < 0.5] = 0.0
    ref = varifocal_loss(logits, targets, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varifocal_loss(logits, targets, reduction="none")
        out_sum = varifocal_loss(logits, targets, reduction="sum")
    assert out.dtype == torch.float32
    assert out_sum.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert math.isclose(out_sum.item(), ref.sum().item(), rel_tol=1e-5)

    # bf16 logits (e.g. a head run under autocast) are computed in float32
    logits_bf16 = logits.bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_bf16 = varifocal_loss(logits_bf16, targets, reduction="none")
    assert out_bf16.dtype == torch.float32
    exp_loss, _ = ref_vfl_tensor(logits_bf16.double(), targets)
    torch.testing.assert_close(out_bf16.double(), exp_loss, rtol=1e-5, atol=1e-6)


def test_varifocal_fp16_inputs_finite():
    logits = torch.tensor([-60000.0, -100.0, -10.0, 0.0, 10.0, 100.0, 60000.0]).half()
    for targets in (torch.zeros(7), torch.full((7,), 0.7), torch.ones(7)):
        x = logits.clone().requires_grad_(True)
        loss = varifocal_loss(x, targets.half(), reduction="none")
        assert loss.dtype == torch.float32
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        assert x.grad.dtype == torch.float16
        assert torch.isfinite(x.grad).all()
        exp_loss, _ = ref_vfl_tensor(logits.double(), targets.half().double())
        torch.testing.assert_close(loss.double(), exp_loss, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- IoU-weighted GIoU loss


def ref_giou(b1, b2):
    """GIoU of two boxes given as float lists, written from the definition."""
    iw = max(min(b1[2], b2[2]) - max(b1[0], b2[0]), 0.0)
    ih = max(min(b1[3], b2[3]) - max(b1[1], b2[1]), 0.0)
    inter = iw * ih
    a1 = (b1[2] - b1[0]) * (b1[3] - b1[1])
    a2 = (b2[2] - b2[0]) * (b2[3] - b2[1])
    union = a1 + a2 - inter
    enclosing = (max(b1[2], b2[2]) - min(b1[0], b2[0])) * (max(b1[3], b2[3]) - min(b1[1], b2[1]))
    iou = inter / union
    return iou, iou - (enclosing - union) / enclosing


def test_giou_loss_partial_overlap_hand_worked():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]])
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]])
    loss, weights = iou_weighted_giou_loss(pred, target)
    iou = 1 / 7  # inter 1, union 4 + 4 - 1 = 7
    giou = 1 / 7 - 2 / 9  # enclosing 3x3 = 9, (9 - 7) / 9
    assert weights.shape == (1,)
    assert math.isclose(weights.item(), iou, rel_tol=1e-6)
    assert math.isclose(loss.item(), iou * (1 - giou), rel_tol=1e-5)
    assert loss.dim() == 0 and loss.dtype == torch.float32


def test_giou_loss_identical_boxes():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [5.0, 7.0, 9.0, 30.0]])
    loss, weights = iou_weighted_giou_loss(boxes, boxes.clone())
    torch.testing.assert_close(weights, torch.ones(2))
    assert abs(loss.item()) < 1e-6


def test_giou_loss_disjoint_boxes():
    pred = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    target = torch.tensor([[2.0, 2.0, 3.0, 3.0]])
    loss, weights = iou_weighted_giou_loss(pred, target)
    # IoU 0 -> weight clamped to 1e-6; GIoU = 0 - (9 - 2) / 9 = -7/9 < 0
    iou, giou = ref_giou(pred[0].tolist(), target[0].tolist())
    assert iou == 0.0 and math.isclose(giou, -7 / 9)
    assert math.isclose(weights.item(), 1e-6, rel_tol=1e-6)
    assert math.isclose(loss.item(), 1e-6 * (1 + 7 / 9), rel_tol=1e-5)


def test_giou_loss_several_boxes_sum():
    pred = torch.tensor(
        [[0.0, 0.0, 2.0, 2.0], [0.0, 0.0, 4.0, 6.0], [10.0, 10.0, 20.0, 20.0], [0.0, 0.0, 1.0, 1.0]]
    )
    target = torch.tensor(
        [[1.0, 1.0, 3.0, 3.0], [2.0, 3.0, 6.0, 9.0], [12.0, 11.0, 18.0, 25.0], [2.0, 2.0, 3.0, 3.0]]
    )
    loss, weights = iou_weighted_giou_loss(pred, target)
    expected_w, expected_loss = [], 0.0
    for p, t in zip(pred.tolist(), target.tolist()):
        iou, giou = ref_giou(p, t)
        w = max(iou, 1e-6)
        expected_w.append(w)
        expected_loss += w * (1 - giou)
    torch.testing.assert_close(weights.double(), torch.tensor(expected_w, dtype=torch.float64))
    assert math.isclose(loss.item(), expected_loss, rel_tol=1e-5)


def test_giou_loss_weights_detached_and_gradient_flows_to_pred():
    pred = torch.tensor(
        [[0.0, 0.0, 2.0, 2.0], [1.0, 2.0, 7.0, 5.0], [0.0, 0.0, 1.0, 1.0]], requires_grad=True
    )
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0], [0.0, 0.0, 6.0, 6.0], [2.0, 2.0, 3.0, 3.0]])
    loss, weights = iou_weighted_giou_loss(pred, target)
    assert not weights.requires_grad
    assert weights.grad_fn is None
    loss.backward()
    assert pred.grad is not None and torch.isfinite(pred.grad).all()
    assert (pred.grad.abs().sum(dim=1) > 0).all()

    # expected: sum_i w_i * d(1 - GIoU_i)/d pred_i with w_i held constant, from an independent
    # float64 GIoU written with torch ops (differentiated by autograd)
    p64 = pred.detach().double().requires_grad_(True)
    t64 = target.double()
    iw = (torch.min(p64[:, 2], t64[:, 2]) - torch.max(p64[:, 0], t64[:, 0])).clamp(min=0)
    ih = (torch.min(p64[:, 3], t64[:, 3]) - torch.max(p64[:, 1], t64[:, 1])).clamp(min=0)
    inter = iw * ih
    union = (p64[:, 2] - p64[:, 0]) * (p64[:, 3] - p64[:, 1]) + (t64[:, 2] - t64[:, 0]) * (
        t64[:, 3] - t64[:, 1]
    ) - inter
    enc = (torch.max(p64[:, 2], t64[:, 2]) - torch.min(p64[:, 0], t64[:, 0])) * (
        torch.max(p64[:, 3], t64[:, 3]) - torch.min(p64[:, 1], t64[:, 1])
    )
    giou = inter / union - (enc - union) / enc
    w = (inter / union).detach().clamp(min=1e-6)
    (w * (1 - giou)).sum().backward()
    torch.testing.assert_close(pred.grad.double(), p64.grad, rtol=1e-4, atol=1e-7)


def test_giou_loss_half_inputs_promoted():
    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]]).half()
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]]).half()
    loss, weights = iou_weighted_giou_loss(pred, target)
    assert loss.dtype == torch.float32 and weights.dtype == torch.float32
    assert math.isclose(loss.item(), (1 / 7) * (1 - (1 / 7 - 2 / 9)), rel_tol=1e-5)


def test_float64_inputs_stay_float64():
    # Low-precision inputs are computed in float32; float64 ones (gradient checks, the DDP
    # equivalence test) keep their precision: the loss agrees with the double-precision
    # reference to float64 rounding, far below float32's 1e-7.
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 5, generator=g, dtype=torch.float64) * 3
    targets = torch.where(torch.rand(64, 5, generator=g) < 0.2, torch.rand(64, 5, generator=g), 0)
    loss, grad = _vfl_and_grad(logits, targets.double())
    ref_loss, ref_grad = ref_vfl_tensor(logits, targets)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-15)

    pred = torch.tensor([[0.0, 0.0, 2.0, 2.0]], dtype=torch.float64)
    target = torch.tensor([[1.0, 1.0, 3.0, 3.0]], dtype=torch.float64)
    loss, weights = iou_weighted_giou_loss(pred, target)
    assert loss.dtype == torch.float64 and weights.dtype == torch.float64
    # (fvcore's giou_loss adds 1e-7 to the union and the enclosing area.)
    assert math.isclose(loss.item(), (1 / 7) * (1 - (1 / 7 - 2 / 9)), rel_tol=1e-6)
