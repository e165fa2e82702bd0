"""
Parity of this project's VFNet with MMDetection's VarifocalNet, through the converter.

Needs MMDetection (skipped without it). Run it with the interpreter of the separate
virtualenv that has it (README: Numerical parity):

    bash tools/install.sh --parity-env venv-mmdet
    venv-mmdet/bin/python -m pytest tests/parity/test_mmdet_parity.py -q

The harness is dev/mmdet_parity.py (run by tools/mmdet_parity.py): MMDetection's
VFNet built from its official config with every tensor perturbed, converted as
tools/convert_mmdet_to_d2.py does, loaded with DetectionCheckpointer, and compared on the same
normalised input.
"""

import os

import pytest
import torch

pytest.importorskip("mmdet", reason="MMDetection is not installed (optional: see README, parity with MMDetection)")
pytest.importorskip("mmengine")
pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from dev import mmdet_parity as mp  # noqa: E402

REL_TOL = 1e-4


@pytest.fixture(scope="module", params=["r50", "r50_dcn"])
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
    """The fake MMDetection checkpoints of tests/checkpoint/test_converter.py have MMDetection's exact keys."""
    from helpers import d2_to_mmdet

    mm_keys = set(report.objects["mm_model"].state_dict())
    fake = set(d2_to_mmdet(report.objects["d2_model"].state_dict()))
    assert fake == {k for k in mm_keys if not k.endswith("num_batches_tracked")}
    bn = {
        k[: -len("running_var")] + "num_batches_tracked" for k in fake if k.endswith(".running_var")
    }
    assert bn == {k for k in mm_keys if k.endswith("num_batches_tracked")}


def test_features_and_head_outputs(report):
    names = {r[1] for r in _rows(report, "features")}
    assert names == {"p3", "p4", "p5", "p6", "p7"}
    head = _rows(report, "head")
    assert len(head) == 15  # logits, initial and refined distances at 5 levels
    for group in ("features", "head"):
        for _, name, abs_, rel in _rows(report, group):
            assert rel <= REL_TOL, f"{group} {name}: max abs {abs_:.3e}, rel {rel:.3e}"


def test_atss_assignment(report):
    n_d2, n_mm = report.facts["atss positives (d2, mmdet)"]
    assert n_d2 == n_mm > 0
    assert report.facts["atss same positive locations"]
    assert report.facts["atss same classes"]
    for _, name, abs_, _ in _rows(report, "atss"):
        assert abs_ <= 1e-4, f"{name}: {abs_}"


def test_losses(report):
    rows = _rows(report, "losses")
    assert len(rows) == 3
    for _, name, abs_, rel in rows:
        assert rel <= REL_TOL, f"{name}: max abs {abs_:.3e}, rel {rel:.3e}"
    assert all(v > 0 for v in report.facts["losses d2"].values())


def test_detections_on_a_real_image(report):
    for tag in ("resized", "original"):
        n_d2, n_mm = report.facts[f"detections {tag} (d2, mmdet)"]
        assert n_d2 == n_mm > 0, tag
        assert report.facts[f"detections {tag} same classes"], tag
    for _, name, abs_, rel in _rows(report, "detections"):
        if name.startswith("boxes"):
            # Relative to the largest coordinate (hundreds of pixels): float32 rounding of the two
            # networks reaches ~1e-3 px there, and differs with the CPU's kernels (AVX2 vs
            # AVX-512); a wrong box is off by pixels.
            assert rel <= 1e-5, f"{name}: {abs_} px, {rel} relative"
        else:
            assert abs_ <= 1e-5, f"{name}: {abs_}"


@torch.no_grad()
def test_harness_detects_a_wrong_tensor(report):
    """Negative control: the comparison is sensitive to a small change of one converted tensor."""
    if report.objects["d2_model"].head.cls_tower[-1].__class__.__name__ != "Conv2d":
        pytest.skip("one negative control is enough (the DCN head is slow on CPU)")
    model = report.objects["d2_model"].train()
    feats = report.objects["d2_features"]
    _, mm_bbox, mm_bbox_rf = report.objects["mm_head_outputs"]
    scales = model.head.scales_refine
    saved = scales.detach().clone()
    try:
        scales.copy_(saved.flip(0))  # levels in the wrong order
        _, _, refine = model.head(feats)
        assert max(mp.diff(a, b)[1] for a, b in zip(refine, mm_bbox_rf)) > 1e-3
    finally:
        scales.copy_(saved)
    _, _, refine = model.head(feats)
    assert max(mp.diff(a, b)[1] for a, b in zip(refine, mm_bbox_rf)) <= REL_TOL


@torch.no_grad()
def test_atss_matcher_matches_mmdet_assigner_with_ties():
    """ATSSMatcher vs mmdet's ATSSAssigner on many random boxes, incl. exact distance ties."""
    mp.install_mmcv_ops_standins()
    from mmdet.models.task_modules.assigners import ATSSAssigner
    from mmdet.models.task_modules.prior_generators import AnchorGenerator
    from mmengine.structures import InstanceData

    from vfnet.modeling.atss import ATSSMatcher

    H, W, strides = 256, 384, [8, 16, 32, 64, 128]
    sizes = [(-(-H // s), -(-W // s)) for s in strides]
    gen = AnchorGenerator(
        ratios=[1.0], octave_base_scale=8, scales_per_octave=1, center_offset=0.0, strides=strides
    )
    levels = gen.grid_priors(sizes, device="cpu")
    anchors, per_level = torch.cat(levels), [len(a) for a in levels]
    assigner, matcher = ATSSAssigner(topk=9), ATSSMatcher(9)
    g = torch.Generator().manual_seed(0)
    for trial in range(120):
        n = int(torch.randint(1, 20, (1,), generator=g))
        if trial % 2:  # centers on grid points / cell midpoints, sizes multiple of 4: exact ties
            c = torch.randint(0, W // 4, (n, 2), generator=g).float() * 4
            c[:, 1] %= H
            wh = torch.randint(1, 60, (n, 2), generator=g).float() * 4
        else:
            c = torch.rand(n, 2, generator=g) * torch.tensor([W, H])
            wh = torch.rand(n, 2, generator=g) * 250 + 4
        boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1)
        expected = (
            assigner.assign(
                InstanceData(priors=anchors),
                per_level,
                InstanceData(bboxes=boxes, labels=torch.zeros(n, dtype=torch.long)),
            ).gt_inds
            - 1
        )
        assert torch.equal(matcher(anchors, per_level, boxes), expected), f"trial {trial}"


@torch.no_grad()
def test_postprocessing_parity_with_boxes_clipped_to_empty():
    """Boxes that clipping makes empty are dropped before NMS on both sides."""
    r = mp.postprocess_edge_case_report(3)
    n_d2, n_mm = r.facts["detections (d2, mmdet)"]
    assert n_d2 == n_mm == 100
    assert r.facts["same classes"]
    for _, name, abs_, _ in r.rows:
        assert abs_ <= 1e-5, name


@pytest.mark.skipif(not os.path.exists(mp.DEFAULT_IMAGE), reason="../shared/datasets/raccoon is absent")
def test_full_test_pipelines_agree_with_the_cv2_resize_backend():
    """
    Each framework's own test pipeline (decode, resize, pad, post-processing to the original
    image): with INPUT.RESIZE_BACKEND "cv2", as in configs/mmdet, the detections are the same.
    """
    facts = mp.end_to_end_report("r50", mp.DEFAULT_IMAGE, num_classes=3)
    key = "e2e [cv2 resize] detections (d2, mmdet), matched (same class, IoU>=0.9), max |box diff| px, max |score diff|"
    n_d2, n_mm, matched, box_diff, score_diff = facts[key]
    assert n_d2 == n_mm == matched > 0
    assert box_diff <= 1e-3 and score_diff <= 1e-5
    _, _, input_diff = facts["e2e [cv2 resize] normalised padded input (d2, mmdet), max |diff|"]
    assert input_diff == 0
