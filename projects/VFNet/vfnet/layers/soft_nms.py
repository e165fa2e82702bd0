"""
Soft-NMS (Bodla et al., 2017) as tensor operations, class-wise like torchvision's `batched_nms`:
the `soft_nms` of MMCV (mmcv/ops/nms.py, CPU kernel `softnms_cpu` in
mmcv/ops/csrc/pytorch/cpu/nms.cpp) that VFNet-X applies after its 0.05 score threshold
(`nms=dict(type='soft_nms', iou_threshold=0.65)`), written with no compiled kernel so that it
runs on any device. Detectron2 and torchvision have no soft-NMS. Imports no Detectron2.

The algorithm, per class, is MMCV's:

1. Select the remaining box of highest score; it is kept with its current score.
2. Multiply the score of every other remaining box by a weight of its IoU with the selected one:
   "linear": 1 - IoU where IoU >= iou_threshold, else 1; "gaussian": exp(-IoU^2 / sigma) for
   all; "naive": 0 where IoU >= iou_threshold, else 1 (hard NMS with >=).
3. Drop the remaining boxes whose score is now below min_score; repeat from 1 while any remain.

IoU without MMCV's +1 (its `offset=0`, as in MMDetection 2.x and later): areas (x2 - x1) *
(y2 - y1), intersection with zero-clamped sides, IoU = inter / (area_a + area_b - inter), in
the same floating-point operations as MMCV's kernel. Two boxes whose union is zero (coincident
zero-area boxes) have IoU 0 here; MMCV's 0 / 0 gives NaN, which leaves the weight at 1 for
"linear" and "naive" (the same as here) and makes the score NaN for "gaussian" (not here).

Ties are broken as MMCV's kernel breaks them: it keeps the boxes in an array in which the selected
box is swapped with the first remaining one and a dropped box is replaced by the last one; the
maximum search takes the first box of the highest score in that array. This module keeps the
same array for every class (one row per class, padded) and does step 1-3 for all classes at once,
so the selections per class are exactly MMCV's, ties included. The first selected box of a class
is kept whatever its score (MMCV tests min_score only after a decay).

Scores are computed in float32, or in float64 when boxes or scores are float64 (MMCV's kernel
takes float32 only); float16 and bfloat16 inputs are computed and returned in float32.
"""
import bisect
from typing import Tuple
import torch
from torch import Tensor

SOFT_NMS_METHODS = ("linear", "gaussian", "naive")

# Rows of the per-class state tensor: 0-3 the box (x1, y1, x2, y2), then its area and score.
_AREA, _SCORE = 4, 5


def _compute_dtype(boxes: Tensor, scores: Tensor) -> torch.dtype:
    if boxes.dtype == torch.float64 or scores.dtype == torch.float64:
        return torch.float64
    return torch.float32


def _check(boxes: Tensor, scores: Tensor, idxs: Tensor, method: str):
    if method not in SOFT_NMS_METHODS:
        raise ValueError(f"soft-NMS method must be one of {SOFT_NMS_METHODS}, got {method!r}")
    if boxes.dim() != 2 or boxes.shape[1] != 4:
        raise ValueError(f"boxes must be (N, 4), got {tuple(boxes.shape)}")
    n = boxes.shape[0]
    if scores.shape != (n,) or idxs.shape != (n,):
        raise ValueError(
            f"scores and idxs must be ({n},), got {tuple(scores.shape)} and {tuple(idxs.shape)}"
        )


def _soft_nms_by_class(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    sigma: float,
    min_score: float,
    method: str,
    max_steps: int,
) -> Tuple[Tensor, Tensor]:
    """
    MMCV's soft-NMS run on the boxes of each class separately (each class's boxes in the order of
    their index), all classes in step, for at most `max_steps` selections per class (<= 0: all).

    Returns:
        selected: (C, T) int64, the index (into boxes) of the box that class k (the k-th smallest
            class id of idxs) selected at step t, in order of selection; -1 after its last one.
        selected_scores: (C, T) its score when selected (float32 or float64).
    """
    device = boxes.device
    dtype = _compute_dtype(boxes, scores)
    n = boxes.shape[0]

    # The boxes of each class, in index order (MMCV's per-class call gets them so), padded to a
    # row per class. Rows are sorted by class size, largest first, so that the rows that still
    # have boxes at step t are a prefix whose length is known without a device sync.
    sorted_idxs, order = torch.sort(idxs, stable=True)
    _, counts = torch.unique_consecutive(sorted_idxs, return_counts=True)
    counts_host = counts.tolist()  # the one sync before the loop
    num_classes, width = len(counts_host), max(counts_host)
    row_of_rank = torch.empty_like(counts)  # row of the class of rank k
    rank_of_row = torch.argsort(counts, descending=True, stable=True)
    row_of_rank[rank_of_row] = torch.arange(num_classes, device=device)
    sizes_desc = sorted(counts_host, reverse=True)
    neg_sizes = [-s for s in sizes_desc]  # ascending, for bisect

    rank = torch.repeat_interleave(torch.arange(num_classes, device=device), counts)
    starts = torch.cumsum(counts, 0) - counts
    col = torch.arange(n, device=device) - starts[rank]
    row = row_of_rank[rank]

    b = boxes[order].to(dtype)
    state = torch.zeros(6, num_classes, width, dtype=dtype, device=device)
    state[:4, row, col] = b.t()
    state[_AREA, row, col] = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    state[_SCORE] = float("-inf")
    state[_SCORE, row, col] = scores[order].to(dtype)
    index = torch.full((num_classes, width), -1, dtype=torch.long, device=device)
    index[row, col] = order
    remaining = counts[rank_of_row].clone()  # boxes left in each row (MMCV's nboxes)

    # Step t of every row: the selected box's index and score (valid for t < its final count).
    selected = torch.full((num_classes, width), -1, dtype=torch.long, device=device)
    selected_scores = torch.zeros(num_classes, width, dtype=dtype, device=device)
    columns = torch.arange(width, device=device)
    # 0-dim tensors in the compute dtype (as MMCV's float parameters), made once.
    neg_inf, zero, one, thr, low, sig = (
        torch.tensor(v, dtype=dtype, device=device)
        for v in (float("-inf"), 0.0, 1.0, iou_threshold, min_score, sigma)
    )

    limit = width  # no row has more boxes (a host-side bound, updated at drops)
    steps = width if max_steps <= 0 else min(width, max_steps)
    for t in range(steps):
        if t >= limit:
            break
        # Rows that had more than t boxes to start with; some may have run out by dropping.
        rows = bisect.bisect_left(neg_sizes, -t)
        st = state[:, :rows, t:]  # position t of MMCV's array is column 0 here
        ix = index[:rows, t:]

        # 1. The first box of highest score (MMCV: strict '<' from position t). Rows that ran
        # out have only -inf scores and select column 0, which is not recorded as valid.
        pos = st[_SCORE].argmax(dim=1, keepdim=True)  # (rows, 1)
        best = st.gather(2, pos.expand(6, rows, 1))  # (6, rows, 1)
        selected[:rows, t] = ix.gather(1, pos)[:, 0]
        selected_scores[:rows, t] = best[_SCORE, :, 0]
        if st.shape[2] == 1:
            break
        # MMCV's swap: the box at position t takes the selected one's place.
        st.scatter_(2, pos.expand(6, rows, 1), st[:, :, :1].clone())
        ix.scatter_(1, pos, ix[:, :1].clone())
        rest, rest_ix = st[:, :, 1:], ix[:, 1:]  # positions t + 1 ...
        length = rest.shape[2]

        # 2. Decay by the IoU with the selected box (MMCV's operations, in the same order).
        wh = (torch.minimum(rest[2:4], best[2:4]) - torch.maximum(rest[:2], best[:2])).clamp_(min=0)
        inter = wh[0] * wh[1]
        union = rest[_AREA] + best[_AREA] - inter
        iou = torch.where(union > zero, inter / union, zero)
        if method == "linear":
            weight = torch.where(iou >= thr, one - iou, one)
        elif method == "gaussian":
            weight = torch.exp(-(iou * iou) / sig)
        else:
            weight = torch.where(iou >= thr, zero, one)
        left = remaining[:rows]
        n_rest = left - (t + 1)  # boxes after position t; negative for rows that ran out
        valid = columns[:length] < n_rest[:, None]
        new_score = torch.where(valid, rest[_SCORE] * weight, neg_inf)
        drop = valid & (new_score < low)
        rest[_SCORE] = new_score

        # 3. Drop below min_score, as MMCV does: going up the array, a dropped box is replaced by
        # the last remaining one (itself decayed and tested there). So the survivors among the
        # first n_keep positions stay, and the k-th dropped box among them (in array order) is
        # replaced by the k-th survivor from the end. (One device sync: most steps drop none.)
        if bool(drop.any()):
            n_keep = n_rest - drop.sum(dim=1)
            inside = columns[None, :length] < n_keep[:, None]
            hole = drop & inside
            back = valid & ~drop & ~inside
            hole_rank = torch.cumsum(hole, dim=1) - 1
            back_count = torch.cumsum(back, dim=1)
            back_rank = back_count[:, -1:] - back_count + back.long() - 1  # counted from the end
            back_col = torch.zeros(rows, length + 1, dtype=torch.long, device=device)
            back_col.scatter_(1, torch.where(back, back_rank, length), columns[:length].expand(rows, length))
            src = torch.where(hole, back_col.gather(1, hole_rank.clamp(min=0)), columns[:length])
            rest.copy_(rest.gather(2, src.expand(6, rows, length)))
            rest_ix.copy_(rest_ix.gather(1, src))
            rest[_SCORE] = torch.where(inside, rest[_SCORE], neg_inf)
            remaining[:rows] = torch.where(left > t, n_keep + (t + 1), left)
            limit = int(remaining.max())
    # A row ends (remaining <= t) only after a step that left it t boxes, so that its final
    # count is its number of selections.
    valid = columns[None, :] < remaining.clamp(max=steps)[:, None]
    selected = torch.where(valid, selected, -1)
    return selected[row_of_rank], selected_scores[row_of_rank]


def soft_nms(
    boxes: Tensor, scores: Tensor, iou_threshold: float, sigma: float = 0.5, min_score: float = 1e-3,
    method: str = "linear", max_num: int = -1,
) -> Tuple[Tensor, Tensor]:
    """
    Soft-NMS of one set of boxes: MMCV's `soft_nms(boxes, scores, iou_threshold, sigma,
    min_score, method)` (offset 0), its ties included.

    Args:
        boxes: (N, 4) boxes in XYXY format (x2 >= x1, y2 >= y1).
        scores: (N,) finite scores.
        iou_threshold: the IoU at and above which "linear" and "naive" decay a score.
        sigma: the width of the "gaussian" decay.
        min_score: boxes whose decayed score falls below it are dropped.
        method: "linear", "gaussian" or "naive".
        max_num: if > 0, stop after that many selections (the first max_num of the result).

    Returns:
        keep: (K,) int64 indices of the kept boxes, in order of selection (decreasing score for
            non-negative scores).
        kept_scores: (K,) their decayed scores, float32 (float64 if boxes or scores are float64).
    """
    idxs = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    _check(boxes, scores, idxs, method)
    if boxes.shape[0] == 0:
        dtype = _compute_dtype(boxes, scores)
        return idxs, torch.zeros(0, dtype=dtype, device=boxes.device)
    selected, selected_scores = _soft_nms_by_class(
        boxes, scores, idxs, iou_threshold, sigma, min_score, method, max_num
    )
    mask = selected[0] >= 0
    return selected[0][mask], selected_scores[0][mask]


def batched_soft_nms(
    boxes: Tensor,
    scores: Tensor,
    idxs: Tensor,
    iou_threshold: float,
    sigma: float = 0.5,
    min_score: float = 1e-3,
    method: str = "linear",
    max_num: int = -1,
) -> Tuple[Tensor, Tensor]:
    """
    Class-wise soft-NMS, in the manner of torchvision's `batched_nms`: `soft_nms` on the boxes of
    each class (in the order of their index), no decay between classes, all classes at once.

    This is MMCV's `batched_nms(boxes, scores, idxs, dict(type='soft_nms', ...))` as it runs
    from 10000 boxes (`split_thr`): `soft_nms` per class, then a sort by decayed score (MMCV
    before 1.3.4 sorted by, and returned, the undecayed scores there). Under 10000 boxes MMCV
    runs one `soft_nms` of all boxes shifted apart by class id x (max coordinate + 1), which
    gives the same boxes and scores except: between boxes of a class with equal scores (that
    array mixes the classes, so that its order among them differs); for a class whose top score
    is below min_score (only the very first box escapes the test there); and in the last bits,
    since the shifted coordinates are rounded to float32 (an IoU at the threshold can flip).

    Args:
        boxes: (N, 4) boxes in XYXY format (x2 >= x1, y2 >= y1).
        scores: (N,) finite scores.
        idxs: (N,) integer class of each box.
        iou_threshold, sigma, min_score, method: as in `soft_nms`.
        max_num: if > 0, return the first max_num of the result only (MMDetection's
            `max_per_img`), computed in max_num steps per class instead of as many as the
            largest class has boxes. Exact when the scores are non-negative or min_score > 0:
            then each class selects in decreasing score, so that the first max_num of all are
            among the first max_num of each class.

    Returns:
        keep: (K,) int64 indices of the kept boxes, sorted by decayed score, decreasing; equal
            scores by class id, then (within a class) in order of selection.
        kept_scores: (K,) their decayed scores, float32 (float64 if boxes or scores are float64).
    """
    _check(boxes, scores, idxs, method)
    if boxes.shape[0] == 0:
        dtype = _compute_dtype(boxes, scores)
        empty = torch.zeros(0, dtype=torch.long, device=boxes.device)
        return empty, torch.zeros(0, dtype=dtype, device=boxes.device)
    selected, selected_scores = _soft_nms_by_class(
        boxes, scores, idxs, iou_threshold, sigma, min_score, method, max_num
    )
    selected, selected_scores = selected.flatten(), selected_scores.flatten()
    mask = selected >= 0
    keep, kept_scores = selected[mask], selected_scores[mask]
    kept_scores, order = torch.sort(kept_scores, descending=True, stable=True)
    keep = keep[order]
    if max_num > 0:
        keep, kept_scores = keep[:max_num], kept_scores[:max_num]
    return keep, kept_scores
