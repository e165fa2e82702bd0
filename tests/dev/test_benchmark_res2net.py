"""tools/benchmark.py --models: the Res2Net-101 VFNets in the inference table beside R-50 (at a tiny
size here; timings are not asserted)."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import ROOT  # noqa: E402


def test_res2net_models_in_the_inference_table(tmp_path):
    out = tmp_path / "bench.json"
    models = ["VFNet", "VFNet-R2-101", "VFNet-R2-101-DCN"]
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--models", *models,
        "--skip-training", "--skip-scaling", "--size", "64", "96", "--iters", "1", "--warmup", "0",
        "--threads", "1", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["inference"]) == models
    for name in models:
        r = report["inference"][name]
        assert r["total"] > 0 and r["peak_memory_mb"] > 0, name
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| VFNet")]
    assert [row.split("|")[1].strip() for row in rows] == models
    # the ratio column: R-50's time over each model's (1.00 for R-50 itself)
    assert rows[0].split("|")[4].strip() == "1.00"


def test_unknown_model_is_refused():
    cmd = [sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--models", "VFNet-R2-50"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "invalid choice: 'VFNet-R2-50'" in proc.stderr
