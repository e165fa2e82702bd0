"""
Training curves (losses, learning rate, AP) from Detectron2's metrics.json into PNGs (what
tools/plot_metrics.py runs). No Detectron2; matplotlib is imported when plotting.
"""
import json
import logging
import math
import os
from typing import Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger("vfnet.plot_metrics")

LOSS_KEYS = ("loss_cls", "loss_bbox", "loss_bbox_refine", "total_loss")
LR_KEYS = ("lr",)
AP_KEYS = ("bbox/AP", "bbox/AP50", "bbox/AP75", "bbox/APs", "bbox/APm", "bbox/APl")
PLOTS = {
    "losses": (LOSS_KEYS, "loss", False),
    "lr": (LR_KEYS, "learning rate", False),
    "ap": (AP_KEYS, "box AP (COCO)", True),
}

Series = Tuple[List[int], List[float]]


def load_metrics(path: str) -> List[dict]:
    """The records of a metrics.json; lines that are not JSON objects (a run killed mid-write) are skipped."""
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s:%d is not JSON, skipped.", path, number)
                continue
            if isinstance(record, dict):
                records.append(record)
    return records


def metric_series(records: Sequence[dict], key: str) -> Series:
    """
    (iterations, values) of `key` in increasing iteration order. Where a resumed run logged an
    iteration twice, the later record wins; non-finite values are dropped.
    """
    by_iteration: Dict[int, float] = {}
    for record in records:
        if key in record and "iteration" in record:
            value = record[key]
            if isinstance(value, (int, float)) and math.isfinite(value):
                by_iteration[int(record["iteration"])] = float(value)
    iterations = sorted(by_iteration)
    return iterations, [by_iteration[i] for i in iterations]


def collect_series(records: Sequence[dict]) -> Dict[str, Dict[str, Series]]:
    """Per plot name, the non-empty series of its keys."""
    out = {}
    for name, (keys, _, _) in PLOTS.items():
        series = {k: metric_series(records, k) for k in keys}
        series = {k: s for k, s in series.items() if s[0]}
        if series:
            out[name] = series
    return out


def _plot(series: Dict[str, Series], ylabel: str, markers: bool, path: str, title: str) -> Dict[str, Series]:
    """Draw `series` into the PNG `path`; returns the data of the drawn lines."""
    from matplotlib.figure import Figure
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for key, (x, y) in series.items():
        ax.plot(x, y, label=key, marker="o" if markers else None, markersize=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, format="png")
    return {
        line.get_label(): ([int(v) for v in line.get_xdata()], [float(v) for v in line.get_ydata()])
        for line in ax.get_lines()
    }


def plot_metrics(output_dir: str, out_dir: Optional[str] = None) -> Dict[str, Dict[str, Series]]:
    """
    Plot OUTPUT_DIR/metrics.json (or a metrics.json path) into `out_dir` (default: its
    directory).

    Returns:
        per PNG written, the data of its lines: {path: {key: (iterations, values)}}.
    """
    path = output_dir if os.path.isfile(output_dir) else os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No metrics.json at {path}.")
    out_dir = out_dir or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    run = os.path.basename(os.path.dirname(os.path.abspath(path)))
    written = {}
    all_series = collect_series(load_metrics(path))
    for name, (keys, ylabel, markers) in PLOTS.items():
        if name not in all_series:
            logger.info("No %s in %s: %s.png skipped.", "/".join(keys), path, name)
            continue
        png = os.path.join(out_dir, f"{name}.png")
        written[png] = _plot(all_series[name], ylabel, markers, png, f"{run}: {ylabel}")
    return written
