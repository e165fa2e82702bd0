"""
The whole-run comparison's reading of runs and its verdict (dev/mmdet_whole_run.py), and the
verdict on the recorded comparison (docs/whole_run/summary.json, made by
tools/compare_mmdet_runs.py): MMDetection's and this project's VFNet end the shapes demo's
whole run at the same losses and AP, within the seeds' spread.
"""
import json
import os

import pytest

from dev import mmdet_whole_run as wr
from helpers import ROOT

RECORDED = os.path.join(ROOT, "docs", "whole_run", "summary.json")


def test_loss_windows_are_detectron2s_medians_of_20():
    """Iteration i has loss i: the window ending at 19 is the median of 0..19 = 9.5, and so on;
    a last, shorter run ends with the window of its last 20 iterations."""
    per_iter = {i: {"loss_a": float(i), "loss_b": float(100 - i)} for i in range(50)}
    windows = wr.loss_windows(per_iter, 50)
    assert list(windows) == [19, 39, 49]
    assert windows[19] == {"loss_a": 9.5, "loss_b": 90.5}
    assert windows[39]["loss_a"] == 29.5
    assert windows[49]["loss_a"] == 39.5  # median of 30..49
    # A missing iteration (an interrupted log) is left out of its window, not read as zero.
    del per_iter[0]
    assert wr.loss_windows(per_iter, 50)[19]["loss_a"] == 10.0


def test_mmdet_scalars_of_a_resumed_run(tmp_path):
    """MMDetection's scalars.json of a run and of its resumption (counted from 1): the later
    file's values win, keyed by Detectron2's 0-based iteration; evaluation lines are not losses."""
    first, second = tmp_path / "20261206_100000" / "vis_data", tmp_path / "20261206_110000" / "vis_data"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    (first / "scalars.json").write_text(
        "\n".join(json.dumps({"lr": 1e-3, "loss": 3.0, "loss_cls": 1.0 + i, "iter": i, "step": i}) for i in (1, 2, 3))
        + '\n{"lr": 1e-3, "loss_cls": 9'  # cut by the interruption
    )
    (second / "scalars.json").write_text(
        json.dumps({"lr": 1e-3, "loss": 3.0, "loss_cls": 7.0, "iter": 3, "step": 3}) + "\n"
        + json.dumps({"coco/bbox_mAP": 0.5, "step": 3}) + "\n"
    )
    per_iter = wr._mmdet_losses(str(tmp_path))
    assert per_iter == {0: {"loss": 3.0, "loss_cls": 2.0}, 1: {"loss": 3.0, "loss_cls": 3.0},
                        2: {"loss": 3.0, "loss_cls": 7.0}}  # fmt: skip


def test_mmdet_metrics_in_detectron2s_names():
    classes = ("circle", "cross")
    metrics = {"coco/bbox_mAP": 0.641, "coco/bbox_mAP_50": 0.9, "coco/bbox_mAP_75": 0.7, "coco/circle_precision": 0.5,
               "coco/cross_precision": 0.25, "coco/bbox_mAP_copypaste": "0.641 ..."}  # fmt: skip
    out = wr._mmdet_bbox_metrics(metrics, classes)
    assert out == pytest.approx({"AP": 64.1, "AP50": 90.0, "AP75": 70.0, "AP-circle": 50.0, "AP-cross": 25.0})
    # No detection at all: MMDetection's CocoMetric returns nothing; that is AP 0 everywhere.
    assert set(wr._mmdet_bbox_metrics({}, classes).values()) == {0.0}


def test_detectron2_result_from_metrics_json(tmp_path):
    """The final evaluation and the loss windows of a Detectron2 run's metrics.json (a line cut by
    an interruption is skipped); no result while the run has no evaluation."""
    lines = [{"iteration": 19, "loss_cls": 1.0, "total_loss": 2.0, "lr": 1e-3},
             {"iteration": 39, "loss_cls": 0.5, "total_loss": 1.0, "lr": 1e-3}]  # fmt: skip
    path = tmp_path / "metrics.json"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert wr.read_result(str(tmp_path)) is None
    with open(path, "a") as f:
        f.write(json.dumps({"iteration": 39, "bbox/AP": 61.5, "bbox/AP50": 90.0, "bbox/AP-circle": 70.0}) + "\n{\"iter")
    result = wr.read_result(str(tmp_path))
    assert result["bbox"] == {"AP": 61.5, "AP50": 90.0, "AP-circle": 70.0}
    assert result["losses"] == {19: {"loss_cls": 1.0}, 39: {"loss_cls": 0.5}}
    assert (tmp_path / "result.json").is_file()


def _summary(aps, cls_last):
    """Runs of both frameworks: per framework, each seed's AP and constant loss_cls."""
    runs = []
    for fw, seeds in aps.items():
        names = list(wr.LOSS_NAMES) if fw == "mmdet" else list(wr.LOSS_NAMES.values())
        for seed, ap in enumerate(seeds):
            value = cls_last[fw][seed]
            losses = {str(i): {n: value for n in names} for i in range(19, 600, 20)}
            losses["479"] = {n: 100.0 for n in names}  # before the last 100 iterations: not counted
            runs.append({"study": "parity", "framework": fw, "detector": "VFNet", "variant": "", "seed": seed,
                         "bbox": {"AP": ap}, "losses": losses})  # fmt: skip
    return {"runs": runs}


def test_verdict_worked_by_hand():
    """Means 64 and 66, spreads 4 and 2: the AP agrees (|64 - 66| = 2 <= 4); loss means 0.5 and
    0.8, spreads 0.2 and 0.0: they do not (0.3 > 0.2)."""
    summary = _summary({"mmdet": [62.0, 64.0, 66.0], "detectron2": [65.0, 66.0, 67.0]},
                       {"mmdet": [0.4, 0.5, 0.6], "detectron2": [0.8, 0.8, 0.8]})  # fmt: skip
    rows = {r["quantity"]: r for r in wr.verdict(summary)}
    assert rows["AP"]["mmdet"] == pytest.approx(64.0) and rows["AP"]["detectron2"] == pytest.approx(66.0)
    assert rows["AP"]["bound"] == pytest.approx(4.0) and rows["AP"]["agree"]
    assert rows["loss_cls"]["difference"] == pytest.approx(0.3) and rows["loss_cls"]["bound"] == pytest.approx(0.2)
    assert not rows["loss_cls"]["agree"]
    with pytest.raises(ValueError, match="no parity runs"):
        wr.verdict({"runs": [r for r in summary["runs"] if r["framework"] == "mmdet"]})


def test_last_iterations_mean_counts_the_windows_of_the_last_100():
    losses = {str(i): {"l": float(i)} for i in range(19, 600, 20)}
    assert wr.last_iterations_mean(losses, "l") == pytest.approx((519 + 539 + 559 + 579 + 599) / 5)


@pytest.mark.parametrize("summary_file", ["summary.json", "summary_small.json"])
def test_recorded_whole_runs_agree(summary_file):
    """The recorded comparisons (3 seeds per framework; the demo, and the 8-20 px boxes of
    docs/SMALL_OBJECTS.md): each loss's mean over the last 100 iterations and the mean box AP of
    the two frameworks within the larger seed spread."""
    with open(os.path.join(os.path.dirname(RECORDED), summary_file)) as f:
        summary = json.load(f)
    rows = wr.verdict(summary)
    assert {r["quantity"] for r in rows} == {"AP", *wr.LOSS_NAMES}
    for r in rows:
        assert len(r["seeds"]["mmdet"]) == len(r["seeds"]["detectron2"]) == 3, r["quantity"]
        assert r["agree"], r


def test_recorded_runs_with_truncated_boxes_disagree():
    """The verdict tells the recorded runs of this project from before the box fix (integer
    boxes truncated after the resize, seeds 0 and 1 of the 8-20 px set) from MMDetection's: their
    AP and box losses lie outside the seeds' spread."""
    with open(os.path.join(os.path.dirname(RECORDED), "summary_small.json")) as f:
        runs = json.load(f)["runs"]
    before = [dict(r, variant="") for r in runs if r["variant"] == "boxes truncated"]
    assert len(before) == 2
    mmdet = [r for r in runs if r["framework"] == "mmdet" and not r["variant"]]
    rows = {r["quantity"]: r for r in wr.verdict({"runs": mmdet + before})}
    assert not rows["AP"]["agree"] and not rows["loss_bbox"]["agree"] and not rows["loss_bbox_rf"]["agree"]
    assert rows["loss_cls"]["agree"]
