"""tools/benchmark.py runs and reports what it measured (its timings are not asserted)."""
import json
import os
import subprocess
import sys
import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import ROOT  # noqa: E402


def test_atss_scaling_report(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "benchmark.py"), "--skip-inference",
        "--skip-training", "--iters", "1", "--warmup", "0", "--atss-boxes", "0", "7",
        "--atss-size", "128", "160", "--atss-sizes", "96", "--json", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    # P3-P7 locations of a 128x160 image: 16x20 + 8x10 + 4x5 + 2x3 + 1x2.
    assert report["atss_by_boxes"]["7"]["locations"] == 428
    # 96x128 (4:3): 12x16 + 6x8 + 3x4 + 2x2 + 1x1.
    assert report["atss_by_size"]["96x128"]["locations"] == 257
    assert all(r["seconds"] > 0 for r in report["atss_by_boxes"].values())
    assert "ATSS + targets, 2 images of 128x160" in proc.stdout
