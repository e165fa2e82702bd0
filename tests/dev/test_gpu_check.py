"""tools/gpu_check.py: its CPU dry run reports every section (its timings are not asserted)."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from dev import gpu_check  # noqa: E402
from dev.gpu_check import MODELS, PRECISIONS, TRAINED, check_kernel  # noqa: E402

from helpers import ROOT  # noqa: E402


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"), "--device", "cpu",
        "--json", str(out / "report.json"), "--markdown", str(out / "report.md"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)  # 4.6 min on 2 busy cores
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((out / "report.json").read_text()), (out / "report.md").read_text()


def test_dry_run_reports_every_section_with_positive_finite_values(dry_run):
    _, report, _ = dry_run
    assert report["ok"] and report["errors"] == [] and report["failures"] == []
    assert report["settings"]["dry_run"] and report["settings"]["size"] == [64, 96]
    assert report["machine"]["torch"] == torch.__version__ and "cuda" in report["machine"]
    assert report["kernel_checks"]["status"] == "skipped"
    assert set(report["training"]) == set(TRAINED)
    for per_precision in report["training"].values():
        assert set(per_precision) == set(PRECISIONS)
        for r in per_precision.values():
            assert r["ok"] and r["losses_finite"] and r["iterations_done"] == r["iterations"] == 2
            assert all(positive(x) for x in r["loss_per_iteration"]) and positive(r["s_per_iter"])
    for key in ("inference", "training_speed"):
        assert set(report[key]) == set(MODELS)
        for per_precision in report[key].values():
            assert set(per_precision) == set(PRECISIONS)
            for r in per_precision.values():
                assert positive(r["total"]) and positive(r["peak_memory_mb"])
    assert positive(report["inference"]["VFNet"]["fp32"]["head"])  # benchmark.py's split
    for r in report["head_memory_format"].values():
        for fmt in ("nchw", "channels-last", "channels-last / nchw"):
            assert positive(r[fmt]["forward_s"]) and positive(r[fmt]["forward_backward_s"])
        assert r["max_rel_diff_outputs"] < 0.05 and r["max_rel_diff_grads"] < 0.05
    assert [(t["what"], t["precision"]) for t in report["targets"]] == [
        ("inference", "fp32"), ("inference", "amp"), ("training step", "fp32"), ("training step", "amp")
    ]
    assert all(positive(t["vfnet_over_fcos"]) for t in report["targets"])
    assert report["paper"]["reference_fps"] == 19.4 and positive(report["paper"]["ratio"])


def test_dry_run_prints_and_writes_the_markdown_summary(dry_run):
    proc, _, text = dry_run
    assert text in proc.stdout
    assert "CPU dry run" in text and "Deformable CUDA kernels: skipped" in text
    for title in ("Training, batch 2", "Inference, batch 1", "Training step, batch 2", "Targets: VFNet / FCOS",
                  "VFNet head under AMP"):  # fmt: skip
        assert title in text
    assert "| VFNet R-50-DCN | amp " in text and "| RetinaNet |" in text


@pytest.mark.parametrize("modulated", [False, True], ids=["DCN", "DCNv2"])
def test_kernel_check_logic_on_the_cpu_branch_of_the_backbone_layers(modulated, monkeypatch):
    # The comparison the GPU run makes, run here on the layers' torchvision branch, smaller.
    monkeypatch.setattr(gpu_check, "KERNEL_SHAPE", (2, 16, 12, 16))
    r = check_kernel("backbone AnyDeviceDeformConv", modulated, "fp32", torch.channels_last, device="cpu")
    assert r["ok"] and r["max_rel_error"] < 1e-5, r
    expected = {"output", "grad weight", "grad x", "grad offset"} | ({"grad mask"} if modulated else set())
    assert set(r["errors"]) == expected


@pytest.mark.parametrize("precision", ["fp32", "amp"])
def test_kernel_check_logic_on_the_head_layer_through_kernel_stand_ins(precision, monkeypatch):
    # The head's DeformConv2d on Detectron2's kernel, here the stand-ins of tests/layers/test_cuda_path.py
    # (which assert the kernel's input requirements), with channels-last inputs.
    import detectron2.layers.deform_conv as d2_deform_conv
    from helpers import stand_in_deform_conv, stand_in_modulated_deform_conv

    monkeypatch.setattr(d2_deform_conv, "deform_conv", stand_in_deform_conv)
    monkeypatch.setattr(d2_deform_conv, "modulated_deform_conv", stand_in_modulated_deform_conv)
    monkeypatch.setattr(gpu_check, "KERNEL_SHAPE", (2, 16, 12, 16))
    for modulated in (False, True):
        r = check_kernel("head DeformConv2d", modulated, precision, torch.channels_last, device="cpu")
        assert r["ok"], r
