"""
Detections of one model in float32 and under TEST.AMP (autocast), matched one to one: what
tools/compare_autocast.py reports. Imports Detectron2.
"""
from typing import Dict, Iterable, List

import torch

from detectron2.structures import Instances, pairwise_iou

__all__ = ["compare_on_loader", "match_detections", "summarize_matches"]


def match_detections(a: Instances, b: Instances, score_thresh: float) -> Dict[str, float]:
    """
    Match each detection of `a` scoring above `score_thresh` to the detection of `b` of the same
    class that overlaps it most (any score), and the same from `b` to `a`.

    Returns:
        dict: "above" (detections of `a` and of `b` above the threshold), "unmatched" (those
        whose best match has IoU < 0.5 or another class), "within_1px" (those matched to a box
        whose coordinates are all within a pixel of theirs), "max_box_diff" (largest coordinate
        difference of a matched pair, pixels) and "max_score_diff".
    """
    out = {"above": 0, "unmatched": 0, "within_1px": 0, "max_box_diff": 0.0, "max_score_diff": 0.0}
    for x, y in ((a, b), (b, a)):
        x = x[x.scores > score_thresh]
        out["above"] += len(x)
        if len(x) == 0:
            continue
        if len(y) == 0:
            out["unmatched"] += len(x)
            continue
        iou = pairwise_iou(x.pred_boxes, y.pred_boxes)
        iou[x.pred_classes[:, None] != y.pred_classes[None, :]] = -1
        best_iou, best = iou.max(dim=1)
        matched = best_iou >= 0.5
        out["unmatched"] += int((~matched).sum())
        if matched.any():
            diff = (x.pred_boxes.tensor[matched] - y.pred_boxes.tensor[best[matched]]).abs()
            out["within_1px"] += int((diff.max(dim=1).values <= 1.0).sum())
            score = (x.scores[matched] - y.scores[best[matched]]).abs()
            out["max_box_diff"] = max(out["max_box_diff"], float(diff.max()))
            out["max_score_diff"] = max(out["max_score_diff"], float(score.max()))
    return out


def summarize_matches(matches: Iterable[Dict[str, float]]) -> Dict[str, float]:
    """The matches of several images together: counts add up, differences take the largest."""
    matches: List[Dict[str, float]] = list(matches)
    return {
        "images": len(matches),
        "above": sum(m["above"] for m in matches),
        "unmatched": sum(m["unmatched"] for m in matches),
        "within_1px": sum(m["within_1px"] for m in matches),
        "max_box_diff": max((m["max_box_diff"] for m in matches), default=0.0),
        "max_score_diff": max((m["max_score_diff"] for m in matches), default=0.0),
    }


def compare_on_loader(fp32, amp, loader, score_thresh: float) -> Dict[str, float]:
    """
    Run the models `fp32` and `amp` (the same weights, TEST.AMP off and on) on every batch of
    `loader` (batches of one image) and summarize the matches of their detections.
    """
    matches = []
    with torch.no_grad():
        for inputs in loader:
            a, b = (model(inputs)[0]["instances"] for model in (fp32, amp))
            matches.append(match_detections(a, b, score_thresh))
    return summarize_matches(matches)
