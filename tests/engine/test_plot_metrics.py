"""vfnet.utils.plot_metrics and tools/plot_metrics.py on a synthetic metrics.json."""
import json
import os
import subprocess
import sys
import pytest

pytest.importorskip("matplotlib", reason="matplotlib is not installed")

from vfnet.utils.plot_metrics import metric_series, plot_metrics  # noqa: E402

from helpers import ROOT  # noqa: E402
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def synthetic_records():
    """Training lines every 20 iterations, evaluation lines (alone, as EvalHook writes them) every 100."""
    records = []
    for it in range(19, 300, 20):
        records.append({
            "iteration": it,
            "total_loss": 3.0 - it / 200,
            "loss_cls": 1.0 - it / 600,
            "loss_bbox": 0.9 - it / 800,
            "loss_bbox_refine": 1.1 - it / 700,
            "lr": 0.01 * min(1.0, (it + 1) / 100),
            "data_time": 0.01,
            "time": 0.5,
        })
        if (it + 1) % 100 == 0:
            records.append({"iteration": it, "bbox/AP": it / 10, "bbox/AP50": it / 5, "bbox/AP75": it / 12})
    return records


def write_metrics(path, records, extra_lines=()):
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
        for line in extra_lines:
            f.write(line)


def expected(records, key):
    pairs = [(r["iteration"], r[key]) for r in records if key in r]
    return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def is_png(path):
    with open(path, "rb") as f:
        header = f.read(24)
    # Signature, then the IHDR chunk: width and height.
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    return header[:8] == PNG_SIGNATURE and header[12:16] == b"IHDR" and width > 100 and height > 100


def test_plots_are_written_with_the_input_data(tmp_path):
    records = synthetic_records()
    # A truncated last line (a run killed mid-write) is skipped.
    write_metrics(tmp_path / "metrics.json", records, extra_lines=['{"iteration": 999, "total_lo'])
    out = tmp_path / "plots"
    written = plot_metrics(str(tmp_path), str(out))

    assert sorted(os.path.basename(p) for p in written) == ["ap.png", "losses.png", "lr.png"]
    for png, lines in written.items():
        assert is_png(png)
    data = {os.path.basename(p): lines for p, lines in written.items()}
    assert sorted(data["losses.png"]) == sorted(["loss_cls", "loss_bbox", "loss_bbox_refine", "total_loss"])
    for key in ("loss_cls", "loss_bbox", "loss_bbox_refine", "total_loss"):
        assert data["losses.png"][key] == expected(records, key)
    assert data["lr.png"] == {"lr": expected(records, "lr")}
    assert sorted(data["ap.png"]) == ["bbox/AP", "bbox/AP50", "bbox/AP75"]
    for key in ("bbox/AP", "bbox/AP50", "bbox/AP75"):
        assert data["ap.png"][key] == expected(records, key)
        assert data["ap.png"][key][0] == [99, 199, 299]


def test_metric_series_orders_and_deduplicates():
    records = [
        {"iteration": 39, "total_loss": 2.0},
        {"iteration": 19, "total_loss": 3.0},
        {"iteration": 39, "total_loss": 1.5},  # a resumed run logs iteration 39 again: it wins
        {"iteration": 59, "total_loss": float("nan")},
        {"iteration": 79, "lr": 0.1},
    ]
    assert metric_series(records, "total_loss") == ([19, 39], [3.0, 1.5])
    assert metric_series(records, "bbox/AP") == ([], [])


def test_cli_without_evaluation_skips_the_ap_plot(tmp_path):
    records = [r for r in synthetic_records() if "bbox/AP" not in r]
    write_metrics(tmp_path / "metrics.json", records)
    cmd = [sys.executable, os.path.join(ROOT, "tools", "plot_metrics.py"), str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(f for f in os.listdir(tmp_path) if f.endswith(".png")) == ["losses.png", "lr.png"]
    assert str(tmp_path / "losses.png") in proc.stdout


def test_missing_metrics_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        plot_metrics(str(tmp_path))
