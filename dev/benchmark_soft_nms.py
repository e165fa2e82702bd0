"""
Class-wise soft-NMS (vfnet.layers.batched_soft_nms) against torchvision's hard `batched_nms` on
CPU, on VFNet-X-like candidates (what tools/benchmark_soft_nms.py runs). No Detectron2.

The candidates stand in for VFNet's post-processing input: 1000 per FPN level x 5 levels
(`nms_pre=1000`), each a (box, class) pair above the 0.05 score threshold, 80 classes. Boxes
cluster around a few dozen objects (so that soft-NMS decays many of them), most of a few
frequent classes; scores fall off from 1 towards the 0.05 threshold, most of them low, as a
detector's do.
"""
import argparse
import platform
import subprocess
import time
import torch
from torchvision.ops import batched_nms

from vfnet.layers.soft_nms import batched_soft_nms, soft_nms

# VFNet-X's test_cfg: nms=dict(type='soft_nms', iou_threshold=0.65), MMCV's defaults otherwise.
IOU_THRESHOLD = 0.65
SCORE_THRESHOLD = 0.05
MAX_PER_IMG = 100


def cpu_model() -> str:
    """lscpu's 'Model name', else platform.processor()."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return platform.processor() or "unknown"


def candidates(levels=5, per_level=1000, num_classes=80, objects=30, seed=0):
    """
    Returns:
        boxes: (levels * per_level, 4) float32 XYXY boxes in an 800 x 1333 image.
        scores: (levels * per_level,) float32 scores in [0.05, 1).
        idxs: (levels * per_level,) int64 classes in [0, num_classes).
    """
    g = torch.Generator().manual_seed(seed)
    n = levels * per_level
    # Objects: centers, sizes, classes (a Zipf-like few frequent classes, as in COCO).
    centers = torch.rand(objects, 2, generator=g) * torch.tensor([1333.0, 800.0])
    sizes = torch.exp(torch.rand(objects, 2, generator=g) * 4 + 2.5)  # 12 .. 670 pixels
    weights = 1.0 / torch.arange(1, num_classes + 1, dtype=torch.float32)
    object_class = torch.multinomial(weights, objects, replacement=True, generator=g)
    # Candidates: 80 % around objects (jittered boxes), 20 % background boxes anywhere.
    which = torch.randint(objects, (n,), generator=g)
    near = torch.rand(n, generator=g) < 0.8
    c = centers[which] + torch.randn(n, 2, generator=g) * sizes[which] * 0.2
    wh = sizes[which] * torch.exp(torch.randn(n, 2, generator=g) * 0.2)
    bg_c = torch.rand(n, 2, generator=g) * torch.tensor([1333.0, 800.0])
    bg_wh = torch.exp(torch.rand(n, 2, generator=g) * 4 + 2.5)
    c, wh = torch.where(near[:, None], c, bg_c), torch.where(near[:, None], wh, bg_wh)
    boxes = torch.cat([c - wh / 2, c + wh / 2], dim=1).clamp(min=0)
    boxes = torch.minimum(boxes, torch.tensor([1333.0, 800.0, 1333.0, 800.0]))
    # Classes: the object's, or (a third of the time, and for background) any other.
    confused = torch.rand(n, generator=g) < 0.33
    idxs = torch.where(near & ~confused, object_class[which], torch.multinomial(weights, n, True, generator=g))
    # Scores: above the 0.05 threshold, most near it (u^3), higher near objects.
    u = torch.rand(n, generator=g)
    scores = SCORE_THRESHOLD + (1 - SCORE_THRESHOLD) * u**3 * torch.where(near & ~confused, 1.0, 0.3)
    return boxes, scores, idxs


def median_seconds(fn, iters, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def soft_nms_class_by_class(boxes, scores, idxs, iou_threshold, method="linear"):
    """The same result as batched_soft_nms, one `soft_nms` call per class (for comparison: the
    classes in sequence rather than in step)."""
    keep, kept = [], []
    for c in torch.unique(idxs):
        members = torch.nonzero(idxs == c).flatten()
        k, s = soft_nms(boxes[members], scores[members], iou_threshold, method=method)
        keep.append(members[k])
        kept.append(s)
    kept, order = torch.sort(torch.cat(kept), descending=True, stable=True)
    return torch.cat(keep)[order], kept


def run_soft_nms_benchmark(iters=5, threads=0, sizes=(1000, 2000, 5000), seed=0):
    """Print the table: torchvision's batched_nms and batched_soft_nms (linear; linear keeping
    the first 100, VFNet-X's max_per_img; linear one class after another; gaussian) on the
    candidates() of each total size (levels of 1000), 80 classes; median of `iters` runs."""
    if threads:
        torch.set_num_threads(threads)
    print(f"CPU: {cpu_model()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {iters} runs")
    print(f"IoU threshold {IOU_THRESHOLD}; soft-NMS sigma 0.5, min_score 1e-3")
    print()
    print("| boxes | classes | largest class | torchvision batched_nms ms (kept) "
          "| soft-NMS linear ms (kept) | linear, max_num=100 ms | linear, class by class ms "
          "| soft-NMS gaussian ms (kept) | linear / hard |")
    print("|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        levels = max(1, n // 1000)
        boxes, scores, idxs = candidates(levels=levels, per_level=n // levels, seed=seed)
        largest = int(torch.bincount(idxs).max())
        classes = int(torch.unique(idxs).numel())
        hard = median_seconds(lambda: batched_nms(boxes, scores, idxs, IOU_THRESHOLD), iters)
        n_hard = batched_nms(boxes, scores, idxs, IOU_THRESHOLD).numel()
        runs = {
            "linear": lambda: batched_soft_nms(boxes, scores, idxs, IOU_THRESHOLD),
            "top 100": lambda: batched_soft_nms(boxes, scores, idxs, IOU_THRESHOLD, max_num=MAX_PER_IMG),
            "by class": lambda: soft_nms_class_by_class(boxes, scores, idxs, IOU_THRESHOLD),
            "gaussian": lambda: batched_soft_nms(boxes, scores, idxs, IOU_THRESHOLD, method="gaussian"),
        }
        seconds = {name: median_seconds(run, iters) for name, run in runs.items()}
        kept = {name: run()[0].numel() for name, run in runs.items()}
        assert kept["by class"] == kept["linear"]
        print(f"| {n} | {classes} | {largest} | {hard * 1e3:.1f} ({n_hard}) "
              f"| {seconds['linear'] * 1e3:.0f} ({kept['linear']}) | {seconds['top 100'] * 1e3:.0f} "
              f"| {seconds['by class'] * 1e3:.0f} "
              f"| {seconds['gaussian'] * 1e3:.0f} ({kept['gaussian']}) | {seconds['linear'] / hard:.0f}x |")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iters", type=int, default=5, help="timed runs per measurement")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 2000, 5000],
                   help="total candidates (levels of 1000)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    run_soft_nms_benchmark(args.iters, args.threads, tuple(args.sizes), args.seed)
