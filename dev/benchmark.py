"""
Speed and memory of VFNet against Detectron2's FCOS and RetinaNet, and ATSS's scaling (what
tools/benchmark.py runs). Imports Detectron2.
"""
import argparse
import json
import multiprocessing as mp
import os
import resource
import statistics
import time
from contextlib import contextmanager, nullcontext

import torch

from detectron2.config import get_cfg, instantiate
from detectron2.data import DatasetCatalog
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from vfnet.config import add_vfnet_config
from vfnet.data.datasets import register_coco_dataset
from vfnet.data.mapper import VFNetDatasetMapper

from . import CONFIGS

VFNET_CONFIG = os.path.join(CONFIGS, "VFNet_R_50_FPN_1x.yaml")
# The VFNets that --models can name, by their config ("VFNet" is the R-50 one).
VFNET_CONFIGS = {
    "VFNet": VFNET_CONFIG,
    "VFNet-R2-101": os.path.join(CONFIGS, "VFNet_R2_101_FPN_MS_2x.yaml"),
    "VFNet-R2-101-DCN": os.path.join(CONFIGS, "VFNet_R2_101_DCN_FPN_MS_2x.yaml"),
    "VFNet-X-800": os.path.join(CONFIGS, "VFNetX_R2_101_DCN_PAFPNX_MS_2x.yaml"),
    "VFNet-FCOS-backbone": VFNET_CONFIG,
}
# Config options of a VFNet of --models. VFNet-FCOS-backbone: the R-50 VFNet on the backbone
# settings of Detectron2's FCOS (stride in the 1x1 conv, frozen BatchNorm) instead of the official
# recipe's (stride in the 3x3 conv as torchvision's ResNet, BatchNorm affine trained): the
# difference of the heads alone.
VFNET_OPTS = {"VFNet-FCOS-backbone": ["MODEL.RESNETS.STRIDE_IN_1X1", "True", "MODEL.RESNETS.NORM", "FrozenBN"]}
MODELS = ("VFNet", "FCOS", "RetinaNet")  # the default of --models


# ----------------------------------------------------------------------------------------------
# Model construction (in the worker process)


def build(name, device, opts=()):
    from detectron2 import model_zoo  # here, in the worker: its import warns (pkg_resources)

    if name == "FCOS":  # Detectron2 has FCOS as a LazyConfig only
        cfg = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
        cfg.model.test_score_thresh = 0.0
        model = instantiate(cfg.model)
    else:
        cfg = get_cfg()
        if name in VFNET_CONFIGS:
            add_vfnet_config(cfg)
            cfg.merge_from_file(VFNET_CONFIGS[name])
            cfg.MODEL.VFNET.TEST_SCORE_THRESH = 0.0
            cfg.merge_from_list(VFNET_OPTS.get(name, []) + list(opts))
        else:
            cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
            cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
        cfg.MODEL.DEVICE = device
        model = build_model(cfg)
    return model.to(device)


def random_instances(h, w, num_boxes, num_classes=80, generator=None):
    xy = torch.rand(num_boxes, 2, generator=generator) * torch.tensor([w * 0.8, h * 0.8])
    wh = (torch.rand(num_boxes, 2, generator=generator) * 0.5 + 0.02) * torch.tensor([w, h])
    boxes = torch.cat([xy, (xy + wh).min(torch.tensor([w - 1.0, h - 1.0]))], dim=1)
    classes = torch.randint(0, num_classes, (num_boxes,), generator=generator)
    return Instances((h, w), gt_boxes=Boxes(boxes), gt_classes=classes)


def dataset_inputs(args, count):
    """The first `count` images of the dataset --images (boxes and classes included), read and
    resized as VFNet_R_50_FPN_1x.yaml's training loader would, without random flips."""
    for spec in args.dataset:
        register_coco_dataset(spec, check_files=False)
    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(VFNET_CONFIG)
    cfg.INPUT.RANDOM_FLIP = "none"
    mapper = VFNetDatasetMapper(cfg, is_train=True)
    records = DatasetCatalog.get(args.images)[:count]
    return [{"image": d["image"].float().to(args.device), "instances": d["instances"]} for d in map(mapper, records)]


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def autocast(args):
    if not args.amp:
        return nullcontext()
    return torch.autocast(args.device, dtype=torch.float16 if args.device == "cuda" else torch.bfloat16)


@contextmanager
def float32_giou_loss():
    """
    Detectron2's dense box losses with fvcore's `giou_loss` on float32 boxes: the smallest
    workaround that trains Detectron2's FCOS under autocast. Its `_dense_box_regression_loss`
    (detectron2/modeling/box_regression.py, the "giou" branch) passes the predicted boxes,
    which `Box2BoxTransformLinear.apply_deltas` builds as `zeros_like` of the head's bf16 (fp16)
    deltas, with float32 targets to fvcore's `giou_loss`, whose line
    `intsctk[mask] = (xkis2[mask] - xkis1[mask]) * (ykis2[mask] - ykis1[mask])`
    (fvcore/nn/giou_loss.py:43) puts a float32 product into the bf16 `zeros_like(x1)`: "Index put
    requires the source and destination dtypes match" (fvcore pull request 114). Only Detectron2's
    name inside the measurement is replaced; VFNet's losses cast to float32 themselves.
    """
    from detectron2.modeling import box_regression

    original = box_regression.giou_loss

    def giou_loss(boxes1, boxes2, *args, **kwargs):
        return original(boxes1.float(), boxes2.float(), *args, **kwargs)

    box_regression.giou_loss = giou_loss
    try:
        yield
    finally:
        box_regression.giou_loss = original


def timed(fn, args):
    """Median seconds of `fn()` over args.iters runs after args.warmup runs."""
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.iters):
        sync(args.device)
        start = time.perf_counter()
        fn()
        sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_mb(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# Measurements (each runs in its own process)


def measure_inference(name, args):
    model = build(name, args.device).eval()
    if args.images:
        inputs = [{"image": dataset_inputs(args, 1)[0]["image"]}]
    else:
        h, w = args.size
        inputs = [{"image": torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)).to(args.device) * 255}]
    h, w = inputs[0]["image"].shape[1:]
    result = {}
    with torch.no_grad(), autocast(args):
        result["total"] = timed(lambda: model(inputs), args)
        if name in VFNET_CONFIGS:
            images = model.preprocess_image(inputs)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            predictions = model.head(features)

            def postprocess():
                out = model.forward_inference(images, features, predictions)
                return detector_postprocess(out[0], h, w)

            result["backbone+FPN"] = timed(lambda: model.backbone(model.preprocess_image(inputs).tensor), args)
            result["head"] = timed(lambda: model.head(features), args)
            result["post-processing"] = timed(postprocess, args)
    result["peak_memory_mb"] = peak_memory_mb(args.device)
    return result


def measure_training(name, args):
    """
    The training step of model `name`: forward, backward and SGD step; with args.amp the forward
    under autocast, as the trainers of SOLVER.AMP.ENABLED run it (bf16 on CPU without loss
    scaling, as CPUAutocastTrainer; fp16 with a GradScaler on CUDA, as Detectron2's AMPTrainer),
    for every model (FCOS with :func:`float32_giou_loss`).
    """
    model = build(name, args.device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    h, w = args.train_size
    g = torch.Generator().manual_seed(0)
    batch = dataset_inputs(args, args.train_batch) if args.images else [
        {"image": (torch.rand(3, h, w, generator=g) * 255).to(args.device),
         "instances": random_instances(h, w, args.train_boxes, generator=g)}
        for _ in range(args.train_batch)
    ]  # fmt: skip
    scaler = torch.amp.GradScaler(enabled=args.amp and args.device == "cuda")

    def step():
        with autocast(args):
            losses = model(batch)
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    result = {}
    with EventStorage(0), float32_giou_loss():
        result["total"] = timed(step, args)
        if name == "VFNet":
            result.update(vfnet_training_split(model, optimizer, batch, args))
    result["peak_memory_mb"] = peak_memory_mb(args.device)
    return result


def vfnet_training_split(model, optimizer, batch, args):
    """Median time of each part of a VFNet training step, timed in sequence within one step."""
    parts = {k: [] for k in ("backbone", "head forward", "ATSS + targets", "losses", "backward + step")}

    def clock():
        sync(args.device)
        return time.perf_counter()

    for i in range(args.warmup + args.iters):
        t0 = clock()
        with autocast(args):
            images = model.preprocess_image(batch)
            features = model.backbone(images.tensor)
            features = [features[f] for f in model.head_in_features]
            t1 = clock()
            logits, boxes_init, boxes_refine = model.head(features)
            t2 = clock()
            logits, boxes_init, boxes_refine = model._transpose_dense_predictions(
                [logits, boxes_init, boxes_refine], [model.num_classes, 4, 4]
            )
            anchors = model.anchor_generator(features)
            gt = [x["instances"].to(model.device) for x in batch]
            gt_labels, gt_boxes = model.label_anchors(anchors, gt, images.image_sizes)
            t3 = clock()
            losses = model.losses(anchors, logits, boxes_init, boxes_refine, gt_labels, gt_boxes)
            t4 = clock()
        sum(losses.values()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t5 = clock()
        if i >= args.warmup:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                parts[key].append(dt)
    return {k: statistics.median(v) for k, v in parts.items()}


def measure_atss(num_boxes, size, args):
    """Time and peak memory of ATSS + targets for a batch of 2 images of `size` with
    `num_boxes` ground-truth boxes each, on VFNet's P3-P7 anchors."""
    # A VFNet with a small backbone, so that the process's peak memory is mostly ATSS's.
    model = build("VFNet", args.device, ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                                         "MODEL.FPN.OUT_CHANNELS", "32"])  # fmt: skip
    h, w = size
    features = [torch.empty(1, 1, -(-h // s), -(-w // s), device=args.device) for s in (8, 16, 32, 64, 128)]
    anchors = model.anchor_generator(features)
    g = torch.Generator().manual_seed(0)
    gt = [random_instances(h, w, num_boxes, generator=g).to(args.device) for _ in range(2)]
    before = peak_memory_mb(args.device)
    seconds = timed(lambda: model.label_anchors(anchors, gt, [size] * 2), args)
    return {"seconds": seconds, "extra_memory_mb": peak_memory_mb(args.device) - before,
            "locations": sum(len(a) for a in anchors)}  # fmt: skip


def _worker(fn_name, fn_args, args, queue):
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        queue.put(("ok", globals()[fn_name](*fn_args, args)))
    except Exception as e:  # reported in the parent, with the measurement's name
        queue.put(("error", f"{type(e).__name__}: {e}"))


def in_fresh_process(fn_name, fn_args, args):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(fn_name, fn_args, args, queue))
    proc.start()
    status, value = queue.get()
    proc.join()
    if status != "ok":
        raise RuntimeError(f"{fn_name}{fn_args}: {value}")
    return value


# ----------------------------------------------------------------------------------------------
# Reporting


def table(title, header, rows):
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = [title, "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"]
    lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines += ["| " + " | ".join(str(x).ljust(w) for x, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def machine():
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__, "python": platform.python_version(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }  # fmt: skip


def precision_name(precision, device):
    """The name of a precision of --precisions in the tables: fp32, bf16 (CPU autocast), fp16 (CUDA)."""
    if precision == "fp32":
        return "fp32"
    return "fp16" if device == "cuda" else "bf16"


def ratio_rows(results, device):
    """
    One row per model and precision (`results`: {precision: {model: result}}), in the models'
    order: s, peak memory, VFNet (R-50) / model of the same precision, the precision, and the
    speed-up of autocast over fp32 where both ran.
    """
    rows = []
    first = next(iter(results.values()))
    for name in first:
        for precision, per_model in results.items():
            r = per_model[name]
            ratio = f"{per_model['VFNet']['total'] / r['total']:.2f}" if "VFNet" in per_model else "-"
            speedup = "-"
            if precision != "fp32" and "fp32" in results:
                speedup = f"{results['fp32'][name]['total'] / r['total']:.2f}x"
            rows.append([name, f"{r['total']:.3f}", f"{r['peak_memory_mb']:.0f}", ratio,
                         precision_name(precision, device), speedup])  # fmt: skip
    return rows


def measure_all(fn_name, args):
    """{precision: {model: result}} of `fn_name` for every model and precision of `args`, each in
    a fresh process, the precisions of a model one after the other."""
    results = {p: {} for p in args.precisions}
    for model in args.models:
        for precision in args.precisions:
            run_args = argparse.Namespace(**dict(vars(args), amp=precision == "amp"))
            results[precision][model] = in_fresh_process(fn_name, (model,), run_args)
    return results


def report_key(section, precision):
    """The JSON key of a section's results: "training" (fp32), "training_amp" (autocast)."""
    return section if precision == "fp32" else f"{section}_amp"


def run_benchmark(args):
    """Run the measurements that `args` (tools/benchmark.py's arguments) ask for, each in a fresh
    process; print their tables and write --json and --plot."""
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"machine": machine(), "args": vars(args)}
    print(f"Machine: {report['machine']}\n")
    mem = "peak GPU MB" if args.device == "cuda" else "peak RSS MB"
    header = ["VFNet / model", "precision", "speed-up over fp32"]

    if not args.skip_inference:
        results = measure_all("measure_inference", args)
        report.update({report_key("inference", p): r for p, r in results.items()})
        h, w = args.size
        where = f"the first image of '{args.images}'" if args.images else f"{h}x{w}"
        print(table(f"Inference, batch 1, {where}, median s/image",
                    ["model", "s/image", mem, *header], ratio_rows(results, args.device)))  # fmt: skip
        parts = ["backbone+FPN", "head", "post-processing"]
        for precision, per_model in results.items():
            for name, v in per_model.items():
                if name in VFNET_CONFIGS:  # each timed part alone (they need not add up to the total)
                    print(table(f"\n{name} inference split ({precision_name(precision, args.device)})",
                                ["part", "s", "share of the total"],
                                [[k, f"{v[k]:.3f}", f"{v[k] / v['total']:.0%}"] for k in parts]) + "\n")  # fmt: skip

    if not args.skip_training:
        results = measure_all("measure_training", args)
        report.update({report_key("training", p): r for p, r in results.items()})
        h, w = args.train_size
        where = f"images of '{args.images}'" if args.images else f"{h}x{w}, {args.train_boxes} boxes/image"
        print(table(f"Training step (forward + backward + SGD step), batch {args.train_batch}, "
                    f"{where}, median s/iter",
                    ["model", "s/iter", mem, *header], ratio_rows(results, args.device)))  # fmt: skip
        for precision, per_model in results.items():
            if "VFNet" in per_model:
                v = per_model["VFNet"]
                parts = ["backbone", "head forward", "ATSS + targets", "losses", "backward + step"]
                print(table(f"\nVFNet training split ({precision_name(precision, args.device)}, timed part by part)",
                            ["part", "s", "share of the sum"],
                            [[k, f"{v[k]:.3f}", f"{v[k] / sum(v[p] for p in parts):.0%}"] for k in parts]) + "\n")  # fmt: skip

    if not args.skip_scaling:
        by_boxes = {n: in_fresh_process("measure_atss", (n, tuple(args.atss_size)), args) for n in args.atss_boxes}
        sizes = [(s, s * 4 // 3) for s in args.atss_sizes]
        by_size = {f"{h}x{w}": in_fresh_process("measure_atss", (100, (h, w)), args) for h, w in sizes}
        report["atss_by_boxes"], report["atss_by_size"] = by_boxes, by_size
        h, w = args.atss_size
        print(table(f"ATSS + targets, 2 images of {h}x{w}, against boxes per image",
                    ["boxes", "locations", "ms", "extra peak MB"],
                    [[n, r["locations"], f"{r['seconds'] * 1e3:.1f}", f"{r['extra_memory_mb']:.0f}"]
                     for n, r in by_boxes.items()]))  # fmt: skip
        print(table("\nATSS + targets, 2 images, 100 boxes each, against image size",
                    ["size", "locations", "ms", "extra peak MB"],
                    [[k, r["locations"], f"{r['seconds'] * 1e3:.1f}", f"{r['extra_memory_mb']:.0f}"]
                     for k, r in by_size.items()]))  # fmt: skip
        if args.plot:
            plot_scaling(by_boxes, by_size, args.plot)

    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)


def plot_scaling(by_boxes, by_size, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    boxes = [n for n in by_boxes if n > 0]
    a.loglog(boxes, [by_boxes[n]["seconds"] * 1e3 for n in boxes], "o-")
    a.set_xlabel("ground-truth boxes per image")
    a.set_ylabel("ATSS + targets, ms (2 images)")
    a.grid(True, which="both", alpha=0.3)
    locations = [r["locations"] for r in by_size.values()]
    b.plot(locations, [r["seconds"] * 1e3 for r in by_size.values()], "o-")
    b.set_xlabel("locations per image (P3-P7), 100 boxes")
    b.set_ylabel("ms (2 images)")
    b.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)

