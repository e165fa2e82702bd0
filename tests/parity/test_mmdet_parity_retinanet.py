"""
Parity of Detectron2's RetinaNet, with converted weights, with MMDetection 3.3's RetinaNet (the
architecture of VarifocalNet's released RetinaNet + FL and RetinaNet + VFL models).

Needs MMDetection (skipped without it); run with the parity virtualenv's interpreter:

    venv-mmdet/bin/python -m pytest tests/parity/test_mmdet_parity_retinanet.py -q

The harness is dev/mmdet_parity_retinanet.py: MMDetection's RetinaNet built from its
configs/retinanet/retinanet_r50_fpn_1x_coco.py with every tensor perturbed, converted as
tools/convert_mmdet_to_d2.py --arch retinanet does, loaded into the model of
configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml, compared on the same input.
"""
import pytest
import torch

pytest.importorskip("mmdet", reason="MMDetection is not installed (optional: see README, parity with MMDetection)")
pytest.importorskip("mmengine")
pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from dev import mmdet_parity as mp  # noqa: E402
from dev.mmdet_parity_retinanet import run_retinanet_parity  # noqa: E402

REL_TOL = 1e-4


@pytest.fixture(scope="module")
def report():
    return run_retinanet_parity(num_classes=3, seed=0)


def _rows(report, group):
    rows = [r for r in report.rows if r[0] == group]
    assert rows, f"no comparison in group {group}"
    return rows


def test_every_tensor_perturbed_converted_and_loaded(report):
    assert report.facts["mmdet tensors left at their default"] == "none"
    assert report.facts["load: missing/unexpected"] == ([], [])
    assert report.facts["d2 tensors not equal to the converted ones"] == "none"


def test_anchors_are_the_same_boxes_in_another_order(report):
    for _, name, abs_, _ in _rows(report, "anchors"):
        assert abs_ <= 1e-4, name
    # MMDetection numbers a location's anchors ratio-major, Detectron2 size-major.
    assert report.facts["anchor orders (mmdet index of each d2 anchor)"] == [[0, 3, 6, 1, 4, 7, 2, 5, 8]] * 5


def test_features_and_head_outputs(report):
    assert {r[1] for r in _rows(report, "features")} == {"p3", "p4", "p5", "p6", "p7"}
    assert len(_rows(report, "head")) == 10  # logits and deltas at 5 levels
    for group in ("features", "head"):
        for _, name, abs_, rel in _rows(report, group):
            assert rel <= REL_TOL, f"{group} {name}: max abs {abs_:.3e}, rel {rel:.3e}"


def test_detections(report):
    for tag in ("resized", "original"):
        n_d2, n_mm = report.facts[f"detections {tag} (d2, mmdet)"]
        assert n_d2 == n_mm > 0, tag
        assert report.facts[f"detections {tag} same classes"], tag
    for _, name, abs_, _ in _rows(report, "detections"):
        assert abs_ <= (1e-3 if name.startswith("boxes") else 1e-5), f"{name}: {abs_}"


@torch.no_grad()
def test_harness_detects_the_anchor_order_and_the_clipping(report):
    """Negative controls: prediction convs left in MMDetection's anchor order, and Detectron2's
    own post-processing order (boxes clipped after the NMS)."""
    from detectron2.modeling.postprocessing import detector_postprocess

    model = report.objects["d2_model"]
    feats = report.objects["d2_features"]
    mm_cls, _ = report.objects["mm_head"]
    saved = model.head.cls_score.weight.detach().clone()
    try:
        model.head.cls_score.weight.copy_(report.objects["mm_model"].bbox_head.retina_cls.weight)
        logits, _ = model.head(feats)
    finally:
        model.head.cls_score.weight.copy_(saved)
    order = report.facts["anchor orders (mmdet index of each d2 anchor)"][0]
    n, _, h, w = mm_cls[0].shape
    mm_in_d2_order = mm_cls[0].reshape(n, len(order), -1, h, w)[:, order].reshape(n, -1, h, w)
    assert mp.diff(logits[0], mm_in_d2_order)[1] > 1e-2  # the converted weights' is <= REL_TOL

    images, (h0, w0) = report.objects["det_images"], report.objects["det_original_size"]
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    assert model.clip_boxes_before_nms  # configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml
    model.clip_boxes_before_nms = False
    try:
        d2 = detector_postprocess(model.forward_inference(images, feats, model.head(feats))[0], h0, w0)
    finally:
        model.clip_boxes_before_nms = True
    mm = report.objects["mm_detections"]
    assert len(d2) != len(mm) or (d2.scores - mm.scores).abs().max() > 1e-3
