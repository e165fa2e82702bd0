"""tools/benchmark_export.py exports, runs each row in its process and reports (timings not asserted)."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")
pytest.importorskip("openvino", reason="openvino is not installed")

from helpers import ROOT  # noqa: E402


def test_eager_and_openvino_rows(tmp_path):
    out = tmp_path / "bench.json"
    rows = ["eager fp32", "OpenVINO fp32 (GridSample)"]
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "benchmark_export.py"), "--rows", *rows,
        "--size", "64", "96", "--iters", "1", "--warmup", "0", "--batch", "2", "--threads", "1",
        "--work-dir", str(tmp_path / "work"), "--json", str(out),
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "64",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert list(report["rows"]) == rows
    for r in report["rows"].values():
        assert r["s/image"] > 0 and r["s/image, batch"] > 0 and r["peak_memory_mb"] > 0
    assert os.path.isfile(tmp_path / "work" / "sampling.xml")
    assert "VFNet inference on the CPU, 64x96, 1 threads" in proc.stdout
