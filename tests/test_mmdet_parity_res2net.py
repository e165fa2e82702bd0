"""
Parity of this project's Res2Net VFNets with MMDetection's, through the converter: the R2-101
and R2-101-DCN models of MMDetection 3.3's configs/vfnet/vfnet_res2net-101_fpn_ms-2x_coco.py and
vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py, every tensor perturbed, converted, loaded into
configs/mmdet/VFNet_R2_101*_FPN_MS_2x.yaml, and compared as tests/test_mmdet_parity.py does
(harness: vfnet/checkpoint/mmdet_parity.py). Needs MMDetection (skipped without it):

    venv-mmdet/bin/python -m pytest tests/test_mmdet_parity_res2net.py -q
"""

import pytest
import torch

pytest.importorskip(
    "mmdet", reason="MMDetection is not installed (optional: see README, parity with MMDetection)"
)
pytest.importorskip("mmengine")
pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from vfnet.checkpoint import mmdet_parity as mp  # noqa: E402
from vfnet.checkpoint.converter import d2_to_mmdet  # noqa: E402

REL_TOL = 1e-4


@pytest.fixture(scope="module", params=["r2_101", "r2_101_dcn"])
def report(request):
    return mp.run_parity(request.param, num_classes=3, seed=0)


def _rows(report, group):
    rows = [r for r in report.rows if r[0] == group]
    assert rows, f"no comparison in group {group}"
    return rows


def test_every_tensor_perturbed_converted_and_loaded(report):
    assert report.facts["mmdet tensors left at their default"] == "none"
    assert report.facts["load: missing/unexpected/shape"] == ([], [], [])
    assert report.facts["d2 tensors not equal to the converted ones"] == "none"


def test_inverse_mapping_reproduces_mmdet_keys(report):
    """The fake checkpoints of tests/test_res2net_converter.py have MMDetection's exact keys."""
    mm_keys = set(report.objects["mm_model"].state_dict())
    fake = set(d2_to_mmdet(report.objects["d2_model"].state_dict()))
    assert fake == {k for k in mm_keys if not k.endswith("num_batches_tracked")}


def test_features_and_head_outputs(report):
    assert {r[1] for r in _rows(report, "features")} == {"p3", "p4", "p5", "p6", "p7"}
    assert len(_rows(report, "head")) == 15
    for group in ("features", "head"):
        for _, name, abs_, rel in _rows(report, group):
            assert rel <= REL_TOL, f"{group} {name}: max abs {abs_:.3e}, rel {rel:.3e}"


def test_atss_assignment(report):
    n_d2, n_mm = report.facts["atss positives (d2, mmdet)"]
    assert n_d2 == n_mm > 0
    assert report.facts["atss same positive locations"] and report.facts["atss same classes"]
    for _, name, abs_, _ in _rows(report, "atss"):
        assert abs_ <= 1e-4, f"{name}: {abs_}"


def test_losses(report):
    rows = _rows(report, "losses")
    assert len(rows) == 3
    for _, name, abs_, rel in rows:
        assert rel <= REL_TOL, f"{name}: max abs {abs_:.3e}, rel {rel:.3e}"


def test_detections_on_a_real_image(report):
    for tag in ("resized", "original"):
        n_d2, n_mm = report.facts[f"detections {tag} (d2, mmdet)"]
        assert n_d2 == n_mm > 0, tag
        assert report.facts[f"detections {tag} same classes"], tag
    for _, name, abs_, _ in _rows(report, "detections"):
        assert abs_ <= (1e-3 if name.startswith("boxes") else 1e-5), f"{name}: {abs_}"


@torch.no_grad()
def test_harness_detects_a_res2net_wiring_error(report):
    """
    Negative control of the backbone: res2's first block with its splits chained (the "normal"
    wiring instead of the "stage" one), or with res4's DCN offsets zeroed, moves the features.
    """
    model = report.objects["d2_model"]
    bottom_up = model.backbone.bottom_up
    x = report.objects["input"]
    mm_res5 = report.objects["mm_model"].backbone(x)[3]
    assert mp.diff(bottom_up(x)["res5"], mm_res5)[1] <= REL_TOL
    block = bottom_up.res2[0]
    block.first_in_stage = False
    try:
        assert mp.diff(bottom_up(x)["res5"], mm_res5)[1] > 1e-2
    finally:
        block.first_in_stage = True
    if bottom_up.res4[0].deform:
        offset = bottom_up.res4[0].conv2_offset[1]
        saved = offset.weight.clone()
        try:
            offset.weight.zero_()
            assert mp.diff(bottom_up(x)["res5"], mm_res5)[1] > 1e-3
        finally:
            offset.weight.copy_(saved)
    assert mp.diff(bottom_up(x)["res5"], mm_res5)[1] <= REL_TOL
