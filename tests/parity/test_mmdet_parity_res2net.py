"""
Parity of this project's Res2Net VFNets with MMDetection's, through the converter: the R2-101
and R2-101-DCN models of MMDetection 3.3's configs/vfnet/vfnet_res2net-101_fpn_ms-2x_coco.py and
vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py, every tensor perturbed, converted, loaded into
configs/mmdet/VFNet_R2_101*_FPN_MS_2x.yaml, and compared as tests/parity/test_mmdet_parity.py does
(harness: dev/mmdet_parity.py). Needs MMDetection (skipped without it):

    venv-mmdet/bin/python -m pytest tests/parity/test_mmdet_parity_res2net.py -q
"""

import pytest
import torch

pytest.importorskip(
    "mmdet", reason="MMDetection is not installed (optional: see README, parity with MMDetection)"
)
pytest.importorskip("mmengine")
pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from dev import mmdet_parity as mp  # noqa: E402

# The comparisons of the R-50 parity test, collected here again with this module's `report`
# fixture (pytest resolves a test's fixtures where it is collected): the same assertions.
from test_mmdet_parity import (  # noqa: E402,F401
    REL_TOL,
    test_atss_assignment,
    test_detections_on_a_real_image,
    test_every_tensor_perturbed_converted_and_loaded,
    test_features_and_head_outputs,
    test_inverse_mapping_reproduces_mmdet_keys,
    test_losses,
)


@pytest.fixture(scope="module", params=["r2_101", "r2_101_dcn"])
def report(request):
    return mp.run_parity(request.param, num_classes=3, seed=0)


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
