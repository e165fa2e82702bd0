"""
vfnet.layers.soft_nms against MMCV's soft-NMS: a reference written here as plain loops over
scalars (MMCV's CPU kernel `softnms_cpu`, mmcv/ops/csrc/pytorch/cpu/nms.cpp, transcribed: its
array, its swaps, its first-maximum search, its drop-by-replacing-with-the-last), on random and
adversarial inputs, plus hand-worked cases and the expected outputs of MMCV's own test
(tests/test_ops/test_nms.py, test_softnms_allclose). MMCV's compiled ops are not installable
here (PyPI has no binary mmcv / mmcv-full wheels; mmcv-lite has no ops), so the comparison is
with the transcription.

The reference computes in float32 (numpy float32 scalars, each operation rounded as in MMCV's
C++) for float32 inputs and in Python floats for float64 inputs, so that kept indices (ties and
threshold decisions included) must agree exactly, and scores within 1e-6.
"""
import math

import numpy as np
import pytest
import torch

from vfnet.layers import batched_soft_nms, soft_nms

METHODS = ("linear", "gaussian", "naive")


# --- the reference ----------------------------------------------------------------------------


def reference_soft_nms(boxes, scores, iou_threshold, sigma=0.5, min_score=1e-3, method="linear", f=float):
    """
    MMCV's softnms_cpu (offset 0) as loops over scalars of type `f` (np.float32 or float).
    Returns (kept indices in order of selection, their scores as Python floats). Zero unions
    give IoU 0 (MMCV: 0 / 0 = NaN; see vfnet/layers/soft_nms.py).
    """
    n = len(boxes)
    x1 = [f(b[0]) for b in boxes]
    y1 = [f(b[1]) for b in boxes]
    x2 = [f(b[2]) for b in boxes]
    y2 = [f(b[3]) for b in boxes]
    sc = [f(s) for s in scores]
    areas = [(x2[k] - x1[k]) * (y2[k] - y1[k]) for k in range(n)]
    inds = list(range(n))
    thr, sig, low, zero, one = f(iou_threshold), f(sigma), f(min_score), f(0.0), f(1.0)
    arrays = [x1, y1, x2, y2, sc, areas, inds]
    keep, kept = [], []
    i = 0
    while i < n:
        max_pos = i
        for pos in range(i + 1, n):
            if sc[max_pos] < sc[pos]:
                max_pos = pos
        for a in arrays:
            a[i], a[max_pos] = a[max_pos], a[i]
        keep.append(inds[i])
        kept.append(float(sc[i]))
        pos = i + 1
        while pos < n:
            w = max(zero, min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            h = max(zero, min(y2[i], y2[pos]) - max(y1[i], y1[pos]))
            inter = w * h
            union = areas[i] + areas[pos] - inter
            ovr = inter / union if union > zero else zero
            weight = one
            if method == "naive":
                if ovr >= thr:
                    weight = zero
            elif method == "linear":
                if ovr >= thr:
                    weight = one - ovr
            else:
                weight = f(math.exp(float(-(ovr * ovr) / sig)))
            sc[pos] = sc[pos] * weight
            if sc[pos] < low:
                for a in arrays:
                    a[pos] = a[n - 1]
                n -= 1
                continue
            pos += 1
        i += 1
    return keep, kept


def reference_batched(boxes, scores, idxs, iou_threshold, sigma=0.5, min_score=1e-3, method="linear", f=float):
    """The reference per class (boxes of a class in index order), merged by score, decreasing;
    equal scores by class id, then order of selection."""
    merged = []
    for rank, c in enumerate(sorted(set(idxs))):
        members = [k for k in range(len(idxs)) if idxs[k] == c]
        keep, kept = reference_soft_nms(
            [boxes[k] for k in members], [scores[k] for k in members], iou_threshold, sigma, min_score, method, f
        )
        merged += [(-s, rank, step, members[k]) for step, (k, s) in enumerate(zip(keep, kept))]
    merged.sort()
    return [m[3] for m in merged], [-m[0] for m in merged]


# --- helpers ----------------------------------------------------------------------------------


def _scalar_type(dtype):
    return np.float32 if dtype == torch.float32 else float


def check(boxes, scores, idxs=None, iou_threshold=0.65, sigma=0.5, min_score=1e-3, method="linear"):
    """Run ours and the reference on the same inputs; assert the same indices, same order, scores
    within 1e-6. Returns ours."""
    f = _scalar_type(boxes.dtype)
    b, s = boxes.tolist(), scores.tolist()
    if idxs is None:
        keep, kept = soft_nms(boxes, scores, iou_threshold, sigma, min_score, method)
        ref_keep, ref_kept = reference_soft_nms(b, s, iou_threshold, sigma, min_score, method, f)
    else:
        keep, kept = batched_soft_nms(boxes, scores, idxs, iou_threshold, sigma, min_score, method)
        ref_keep, ref_kept = reference_batched(b, s, idxs.tolist(), iou_threshold, sigma, min_score, method, f)
    assert keep.dtype == torch.long and kept.dtype == boxes.dtype
    assert keep.tolist() == ref_keep
    np.testing.assert_allclose(kept.numpy(), np.array(ref_kept), rtol=0, atol=1e-6)
    return keep, kept


def random_detections(n, num_classes, seed, dtype=torch.float32, clusters=None):
    """Detector-like candidates: boxes jittered around a few objects (so that IoUs spread over
    0..1, many around the thresholds), scores in [0.05, 1), classes at random."""
    g = torch.Generator().manual_seed(seed)
    clusters = clusters or max(1, n // 20)
    centers = torch.rand(clusters, 2, generator=g, dtype=torch.float64) * 800
    sizes = torch.rand(clusters, 2, generator=g, dtype=torch.float64) * 150 + 10
    which = torch.randint(clusters, (n,), generator=g)
    c = centers[which] + torch.randn(n, 2, generator=g, dtype=torch.float64) * sizes[which] * 0.15
    wh = sizes[which] * (1 + torch.randn(n, 2, generator=g, dtype=torch.float64) * 0.15).clamp(min=0.2)
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).to(dtype)
    scores = (0.05 + 0.95 * torch.rand(n, generator=g, dtype=torch.float64)).to(dtype)
    idxs = torch.randint(num_classes, (n,), generator=g)
    return boxes, scores, idxs


# --- random inputs ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_one_class(method, seed):
    boxes, scores, _ = random_detections(150, 1, seed)
    check(boxes, scores, method=method)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n,num_classes,seed", [(300, 3, 0), (600, 10, 1), (1000, 8, 2), (1000, 80, 3)])
def test_random_batched(method, n, num_classes, seed):
    boxes, scores, idxs = random_detections(n, num_classes, seed)
    check(boxes, scores, idxs, method=method)


@pytest.mark.parametrize("method", ["linear", "gaussian"])
def test_random_float64(method):
    boxes, scores, idxs = random_detections(400, 4, 5, dtype=torch.float64)
    check(boxes, scores, idxs, method=method)


def test_random_1000_boxes_one_class():
    boxes, scores, _ = random_detections(1000, 1, 7, dtype=torch.float64, clusters=30)
    check(boxes, scores, method="linear")


@pytest.mark.parametrize("method", ["linear", "gaussian"])
@pytest.mark.parametrize("min_score", [0.0, 0.3])
def test_random_other_thresholds(method, min_score):
    # min_score 0.3 drops many boxes (the compaction of MMCV's array at every step).
    boxes, scores, idxs = random_detections(400, 5, 11)
    check(boxes, scores, idxs, iou_threshold=0.3, sigma=0.2, min_score=min_score, method=method)


# --- adversarial inputs -----------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("seed", [0, 1])
def test_exact_ties_in_scores(method, seed):
    # Three score values over overlapping boxes: the order among equal scores is MMCV's array
    # order, which its swaps and drops permute.
    boxes, _, idxs = random_detections(300, 3, seed, clusters=6)
    g = torch.Generator().manual_seed(seed)
    scores = torch.tensor([0.3, 0.5, 0.9])[torch.randint(3, (300,), generator=g)]
    check(boxes, scores, method=method)
    check(boxes, scores, idxs, method=method)
    check(boxes, scores, idxs, method=method, iou_threshold=0.3, min_score=0.2)


@pytest.mark.parametrize("method", METHODS)
def test_all_scores_equal(method):
    boxes, _, idxs = random_detections(200, 4, 3, clusters=5)
    scores = torch.full((200,), 0.5)
    check(boxes, scores, method=method)
    check(boxes, scores, idxs, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_identical_boxes(method):
    box = [10.0, 20.0, 50.0, 80.0]
    boxes = torch.tensor([box] * 6 + [[12.0, 20.0, 50.0, 80.0], [0.0, 0.0, 5.0, 5.0]] + [box] * 4)
    scores = torch.tensor([0.9, 0.9, 0.7, 0.9, 0.2, 0.05, 0.6, 0.6, 0.9, 0.7, 0.3, 0.3])
    check(boxes, scores, method=method)
    check(boxes, scores, torch.tensor([0, 1] * 6), method=method)
    check(boxes, scores, method=method, min_score=0.0)


@pytest.mark.parametrize("method", METHODS)
def test_every_box_its_own_class(method):
    boxes, scores, _ = random_detections(80, 1, 4, clusters=2)
    keep, kept = check(boxes, scores, torch.arange(80), method=method)
    # Nothing decays across classes: every box is kept with its score, by decreasing score.
    assert sorted(keep.tolist()) == list(range(80))
    assert torch.equal(kept, scores.sort(descending=True).values)


@pytest.mark.parametrize("method", METHODS)
def test_all_classes_many_boxes_each(method):
    boxes, scores, idxs = random_detections(800, 80, 8, clusters=10)
    check(boxes, scores, idxs, method=method)


@pytest.mark.parametrize("method", METHODS)
def test_box_inside_another_and_zero_area_boxes(method):
    boxes = torch.tensor(
        [
            [0.0, 0.0, 100.0, 100.0],
            [10.0, 10.0, 90.0, 90.0],  # inside the first: IoU 0.64
            [20.0, 20.0, 80.0, 80.0],  # inside both
            [30.0, 30.0, 30.0, 30.0],  # points: zero area, zero unions among them
            [30.0, 30.0, 30.0, 30.0],
            [30.0, 30.0, 60.0, 30.0],  # a segment
            [0.0, 0.0, 100.0, 100.0],  # identical to the first
            [5.0, 5.0, 100.0, 100.0],
        ]
    )
    scores = torch.tensor([0.5, 0.8, 0.6, 0.7, 0.7, 0.3, 0.5, 0.45])
    for thr in (0.3, 0.64, 0.65):
        check(boxes, scores, iou_threshold=thr, method=method)
        check(boxes, scores, torch.tensor([0, 0, 1, 0, 1, 0, 1, 0]), iou_threshold=thr, method=method)


def test_zero_area_boxes_keep_their_scores():
    boxes = torch.tensor([[3.0, 1.0, 3.0, 1.0]] * 3 + [[0.0, 5.0, 10.0, 5.0]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    for method in METHODS:
        keep, kept = soft_nms(boxes, scores, 0.1, method=method)
        assert keep.tolist() == [0, 1, 2, 3]
        assert torch.equal(kept, scores)  # IoU 0 (MMCV's 0 / 0 would make gaussian scores NaN)


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_single(method):
    for dtype in (torch.float32, torch.float64, torch.float16):
        keep, kept = soft_nms(torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), 0.65, method=method)
        assert keep.shape == (0,) and keep.dtype == torch.long
        assert kept.shape == (0,) and kept.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        keep, kept = batched_soft_nms(
            torch.zeros(0, 4, dtype=dtype), torch.zeros(0, dtype=dtype), torch.zeros(0, dtype=torch.long), 0.65
        )
        assert keep.shape == (0,) and kept.shape == (0,)
    one = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    check(one, torch.tensor([0.5]), method=method)
    check(one, torch.tensor([0.5]), torch.tensor([7]), method=method)
    # MMCV tests min_score only after a decay: a lone box is kept whatever its score, and so is
    # the first box of a class.
    keep, kept = soft_nms(one, torch.tensor([1e-5]), 0.65, method=method)
    assert keep.tolist() == [0] and kept.tolist() == [pytest.approx(1e-5)]
    check(torch.cat([one, one + 50]), torch.tensor([1e-5, 2e-5]), torch.tensor([0, 0]), method=method)
    check(torch.cat([one, one + 50]), torch.tensor([1e-5, 2e-5]), torch.tensor([0, 1]), method=method)


# --- hand-worked cases ------------------------------------------------------------------------


def test_two_boxes_iou_08_linear_and_gaussian():
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0]])  # IoU 80 / 100
    scores = torch.tensor([0.9, 0.6])
    keep, kept = soft_nms(boxes, scores, 0.65)  # linear: 0.6 x (1 - 0.8)
    assert keep.tolist() == [0, 1] and kept.tolist() == pytest.approx([0.9, 0.12], abs=1e-7)
    keep, kept = soft_nms(boxes, scores, 0.65, method="gaussian")  # 0.6 x exp(-0.64 / 0.5)
    assert keep.tolist() == [0, 1] and kept.tolist() == pytest.approx([0.9, 0.6 * math.exp(-1.28)], abs=1e-7)
    keep, kept = soft_nms(boxes, scores, 0.85)  # below the threshold: no decay
    assert kept.tolist() == pytest.approx([0.9, 0.6], abs=1e-7)
    keep, kept = soft_nms(boxes, scores, 0.65, method="naive")  # 0.6 x 0 < min_score: dropped
    assert keep.tolist() == [0]


def test_threshold_is_inclusive():
    # MMCV's soft-NMS decays at IoU >= iou_threshold (its hard NMS uses >).
    boxes = torch.tensor([[0.0, 0.0, 4.0, 4.0], [0.0, 0.0, 4.0, 2.0], [0.0, 0.0, 4.0, 1.75]])
    scores = torch.tensor([0.9, 0.8, 0.7])  # IoUs with the first: 8/16 = 0.5 and 7/16
    keep, kept = soft_nms(boxes[:2], scores[:2], 0.5)
    assert kept.tolist() == pytest.approx([0.9, 0.4], abs=1e-7)
    keep, kept = soft_nms(boxes[[0, 2]], scores[[0, 2]], 0.5)
    assert kept.tolist() == pytest.approx([0.9, 0.7], abs=1e-7)


def test_decayed_box_falls_below_a_later_one():
    # After the decay the second box (0.8 x 0.2 = 0.16) ranks below the third (0.5, no overlap).
    boxes = torch.tensor([[0.0, 0.0, 10.0, 10.0], [0.0, 0.0, 10.0, 8.0], [50.0, 50.0, 60.0, 60.0]])
    keep, kept = soft_nms(boxes, torch.tensor([0.9, 0.8, 0.5]), 0.65)
    assert keep.tolist() == [0, 2, 1] and kept.tolist() == pytest.approx([0.9, 0.5, 0.16], abs=1e-7)


def test_mmcv_expected_outputs():
    # The inputs and expected outputs of MMCV's test_softnms_allclose (iou 0.3, sigma 0.5,
    # min_score 0.01).
    boxes = torch.tensor([[6.0, 3.0, 8.0, 7.0], [3.0, 6.0, 9.0, 11.0], [3.0, 7.0, 10.0, 12.0], [1.0, 4.0, 13.0, 7.0]])
    scores = torch.tensor([0.6, 0.9, 0.7, 0.2])
    expected = {
        "linear": ([1, 0, 2, 3], [0.9, 0.6, 0.29024392, 0.2]),
        "gaussian": ([1, 0, 2, 3], [0.9, 0.59630775, 0.35275510, 0.18650459]),
        "naive": ([1, 0, 3], [0.9, 0.6, 0.2]),
    }
    for method, (inds, dets) in expected.items():
        keep, kept = soft_nms(boxes, scores, 0.3, sigma=0.5, min_score=0.01, method=method)
        assert keep.tolist() == inds
        np.testing.assert_allclose(kept.numpy(), dets, rtol=1e-5, atol=1e-8)
        check(boxes, scores, iou_threshold=0.3, min_score=0.01, method=method)


def test_mmcv_docstring_example():
    # MMCV's soft_nms docstring: zero-area boxes and a tie at the top; 5 of 6 kept.
    boxes = torch.tensor(
        [[4.0, 3.0, 5.0, 3.0], [4.0, 3.0, 5.0, 4.0]] + [[3.0, 1.0, 3.0, 1.0]] * 4
    )
    scores = torch.tensor([0.9, 0.9, 0.5, 0.5, 0.4, 0.0])
    keep, _ = soft_nms(boxes, scores, 0.6, sigma=0.5)
    assert keep.tolist() == [0, 1, 2, 3, 4]


# --- API --------------------------------------------------------------------------------------


def test_batched_is_soft_nms_per_class():
    boxes, scores, idxs = random_detections(300, 4, 9)
    keep, kept = batched_soft_nms(boxes, scores, idxs + 1000, 0.65)  # any class ids
    for c in range(4):
        members = torch.nonzero(idxs == c).flatten()
        k, s = soft_nms(boxes[members], scores[members], 0.65)
        mine = idxs[keep] == c
        assert torch.equal(keep[mine], members[k]) and torch.equal(kept[mine], s)
    one_class = batched_soft_nms(boxes, scores, torch.zeros_like(idxs), 0.65)
    alone = soft_nms(boxes, scores, 0.65)
    assert all(torch.equal(a, b) for a, b in zip(one_class, alone))
    assert torch.equal(batched_soft_nms(boxes, scores, idxs.int(), 0.65)[0], keep)  # int32 ids


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_compute_in_float32(dtype):
    boxes, scores, idxs = random_detections(300, 3, 6)
    boxes, scores = boxes.to(dtype), scores.to(dtype)
    keep, kept = batched_soft_nms(boxes, scores, idxs, 0.65)
    assert kept.dtype == torch.float32
    ref = batched_soft_nms(boxes.float(), scores.float(), idxs, 0.65)
    assert torch.equal(keep, ref[0]) and torch.equal(kept, ref[1])


def test_float64_is_kept():
    boxes, scores, idxs = random_detections(50, 2, 6, dtype=torch.float64)
    assert batched_soft_nms(boxes, scores, idxs, 0.65)[1].dtype == torch.float64
    assert soft_nms(boxes.float(), scores, 0.65)[1].dtype == torch.float64


def test_inputs_are_not_modified():
    boxes, scores, idxs = random_detections(100, 2, 1)
    copies = boxes.clone(), scores.clone(), idxs.clone()
    batched_soft_nms(boxes, scores, idxs, 0.65, method="gaussian")
    assert all(torch.equal(a, b) for a, b in zip((boxes, scores, idxs), copies))


def test_bad_arguments():
    boxes, scores = torch.zeros(3, 4), torch.zeros(3)
    with pytest.raises(ValueError, match="method"):
        soft_nms(boxes, scores, 0.5, method="hard")
    with pytest.raises(ValueError, match="boxes"):
        soft_nms(torch.zeros(3, 5), scores, 0.5)
    with pytest.raises(ValueError, match="idxs"):
        batched_soft_nms(boxes, scores, torch.zeros(2, dtype=torch.long), 0.5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    boxes, scores, idxs = random_detections(1000, 20, 12)
    cpu = batched_soft_nms(boxes, scores, idxs, 0.65, method=method)
    gpu = batched_soft_nms(boxes.cuda(), scores.cuda(), idxs.cuda(), 0.65, method=method)
    assert gpu[0].is_cuda and torch.equal(gpu[0].cpu(), cpu[0])
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", METHODS)
def test_max_num_is_the_head_of_the_result(method):
    boxes, scores, idxs = random_detections(600, 6, 13)
    tie_scores = torch.tensor([0.3, 0.5, 0.9])[torch.randint(3, (600,), generator=torch.Generator().manual_seed(1))]
    for s in (scores, tie_scores):
        full = batched_soft_nms(boxes, s, idxs, 0.65, method=method)
        alone = soft_nms(boxes, s, 0.65, method=method)
        for k in (1, 5, 100, 599, 600, 1000):
            head = batched_soft_nms(boxes, s, idxs, 0.65, method=method, max_num=k)
            assert torch.equal(head[0], full[0][:k]) and torch.equal(head[1], full[1][:k])
            head = soft_nms(boxes, s, 0.65, method=method, max_num=k)
            assert torch.equal(head[0], alone[0][:k]) and torch.equal(head[1], alone[1][:k])


def test_benchmark_tool_runs(capsys):
    # Its timings are not asserted: it runs, and prints the CPU and one row per size.
    from dev.benchmark_soft_nms import main

    threads = torch.get_num_threads()
    try:
        main(["--iters", "1", "--sizes", "1000", "--threads", "1"])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "| 1000 | " in out


def test_vfnet_with_soft_nms_keeps_the_top_of_batched_soft_nms_of_its_candidates():
    """MODEL.VFNET.TEST_NMS_TYPE soft_nms: the detections are batched_soft_nms of the candidates."""
    pytest.importorskip("detectron2")
    from detectron2.modeling import build_model

    from helpers import small_cfg

    cfg = small_cfg("MODEL.VFNET.TEST_NMS_TYPE", "soft_nms", "MODEL.VFNET.TEST_NMS_THRESH", "0.65")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    torch.nn.init.zeros_(model.head.cls_score.bias)  # scores near 0.5: many candidates
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    inputs = [{"image": image, "height": 96, "width": 128}]
    with torch.no_grad():
        (candidates,) = model.inference_candidates(inputs)
        (detections,) = [out["instances"] for out in model(inputs)]
    boxes, scores, classes = candidates.pred_boxes.tensor, candidates.scores, candidates.pred_classes
    keep, decayed = batched_soft_nms(boxes, scores, classes, 0.65, sigma=0.5, min_score=1e-3)
    # (the linear decay takes many candidates below min_score: fewer than 100 may remain)
    assert len(candidates) > 300 and len(detections) == min(100, len(keep)) > 50
    assert torch.equal(detections.pred_boxes.tensor, boxes[keep[:100]])
    assert torch.equal(detections.scores, decayed[:100])
    assert torch.equal(detections.pred_classes, classes[keep[:100]])
    assert (detections.scores < scores[keep[:100]]).any()  # decayed, not the raw scores

    cfg.MODEL.VFNET.TEST_NMS_TYPE = "softnms"
    with pytest.raises(ValueError, match='TEST_NMS_TYPE is "softnms"'):
        build_model(cfg)
