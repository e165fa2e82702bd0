"""
The one prepared check of the GPU path (what tools/gpu_check.py runs), in one process:

1. Detectron2's deformable CUDA kernels (DCN and DCNv2, through the head's DeformConv2d and the
   backbone's AnyDevice layers) against the CPU gather kernel, forward and backward, fp32 and
   under autocast, NCHW and channels-last inputs;
2. training iterations of VFNet R-50 and R-50-DCN, fp32 and AMP (autocast + GradScaler, as
   SOLVER.AMP.ENABLED), whose losses must stay finite;
3. inference and training speed of VFNet, Detectron2's FCOS and RetinaNet (tools/benchmark.py's
   measurements), and VFNet's head channels-last against NCHW under AMP;
4. a JSON report and a Markdown summary, with the ratios against the targets.

Device "cpu" is a dry run of the same logic at tiny sizes (no kernel checks). Imports Detectron2.
"""
import gc
import json
import statistics
import time
import traceback
from types import SimpleNamespace

import torch

from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.utils.events import EventStorage

from vfnet.layers.deform_conv import DeformConv2d, deform_conv2d_by_gather
from vfnet.modeling.backbone.resnet_fpn import AnyDeviceDeformConv, AnyDeviceModulatedDeformConv
from vfnet.engine.train_loop import NonFiniteLossError
from . import benchmark
from .benchmark import autocast, build, machine, measure_inference, measure_training, random_instances, sync, table

MODELS = benchmark.MODELS  # VFNet, FCOS, RetinaNet (R-50-FPN)
PRECISIONS = ("fp32", "amp")
DCN_OPTS = [
    "MODEL.RESNETS.DEFORM_ON_PER_STAGE", "[False, True, True, True]",
    "MODEL.RESNETS.DEFORM_MODULATED", "True",
    "MODEL.VFNET.DCN_ON_LAST_CONV", "True",
]  # fmt: skip
TRAINED = {"VFNet R-50": [], "VFNet R-50-DCN": DCN_OPTS}
TARGETS = {"inference": 1.10, "training step": 1.20}  # VFNet / FCOS, s per image / per iteration
PAPER_FPS = 19.4  # the paper: VFNet R-50 on a V100, batch 1, 800x1333
SECTIONS = ("kernels", "training", "inference", "training-speed", "head")
# Defaults per device: the full check on CUDA, a dry run of a few seconds on CPU (one thread:
# on a shared machine, every parallel region of torch's thread pool waits for a time slice).
DEFAULTS = {
    "cuda": {"size": (800, 1333), "train_iters": 50, "iters": 20, "warmup": 5, "threads": 0},
    "cpu": {"size": (64, 96), "train_iters": 2, "iters": 2, "warmup": 1, "threads": 1},
}
# Kernel checks: N x C x H x W of the input; largest relative error accepted per precision
# (autocast: the fp16 input's gradient is rounded to fp16, 2^-11).
KERNEL_SHAPE = (2, 64, 48, 64)
KERNEL_TOLERANCE = {"fp32": 1e-4, "amp": 1e-2}
TRAIN_BOXES = 10  # random ground-truth boxes per training image
TRAIN_LR = 1e-3  # SGD, momentum 0.9: the configs' learning rate at the start of the warm-up


def settings(args):
    """The check's settings: `args` (tools/gpu_check.py's) with the device's defaults filled in."""
    s = dict(DEFAULTS[args.device])
    for key in list(s):
        if getattr(args, key, None) is not None:
            s[key] = tuple(getattr(args, key)) if key == "size" else getattr(args, key)
    s.update(device=args.device, batch=args.batch, dry_run=args.device == "cpu", budget_s=args.budget_s)
    s["skip"] = sorted(set(args.skip or []))
    return s


def namespace(s, amp):
    """The arguments of vfnet.utils.benchmark's measurements for settings `s`."""
    return SimpleNamespace(
        device=s["device"], amp=amp, warmup=s["warmup"], iters=s["iters"], images=None,
        size=list(s["size"]), train_size=list(s["size"]), train_batch=s["batch"], train_boxes=TRAIN_BOXES,
    )  # fmt: skip


def amp_dtype(device):
    """The autocast dtype of "amp" (vfnet.utils.benchmark.autocast)."""
    return torch.float16 if device == "cuda" else torch.bfloat16


def reset_memory(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def describe_machine(device):
    """benchmark.machine() with the CUDA, cuDNN and Detectron2 versions."""
    import detectron2

    info = machine()
    info.update(
        device=device, cuda=torch.version.cuda, detectron2=detectron2.__version__,
        cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        cudnn_benchmark=torch.backends.cudnn.benchmark,
    )  # fmt: skip
    if device == "cuda":
        from detectron2 import _C

        info["gpu"] = torch.cuda.get_device_name()
        info["detectron2_cuda"] = _C.get_cuda_version()
    return info


# ----------------------------------------------------------------------------------------------
# 1. Kernel checks


def relative_error(ours, reference):
    ours, reference = ours.detach().double().cpu(), reference.detach().double().cpu()
    return float((ours - reference).norm() / reference.norm().clamp(min=1e-30))


def deform_layer(kind, channels, modulated):
    """The layer under test: the head's DeformConv2d on Detectron2's kernel, or the backbone's."""
    if kind == "head DeformConv2d":
        return DeformConv2d(channels, channels, 3, padding=1, bias=modulated, impl="detectron2")
    layer = (ModulatedDeformConv if modulated else DeformConv)(channels, channels, 3, padding=1)
    layer.__class__ = AnyDeviceModulatedDeformConv if modulated else AnyDeviceDeformConv
    return layer


def check_kernel(kind, modulated, precision, memory_format, device="cuda"):
    """
    One layer on `device` against the gather kernel on CPU in float64, on the same inputs (for
    "amp", x in float16, as a conv under autocast delivers it).

    Returns:
        dict: the relative error of the output and of each gradient, and "ok".
    """
    n, c, h, w = KERNEL_SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=g)
    offset = torch.randn(n, 18, h, w, generator=g) * 3
    mask = torch.rand(n, 9, h, w, generator=g) if modulated else None
    layer = deform_layer(kind, c, modulated)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 0.05)
        if layer.bias is not None:
            layer.bias.copy_(torch.randn(c, generator=g))
    layer = layer.to(device)
    inputs = {"x": x.half() if precision == "amp" else x, "offset": offset, "mask": mask}
    inputs = {
        k: None if t is None else t.to(device).contiguous(memory_format=memory_format).requires_grad_()
        for k, t in inputs.items()
    }
    with torch.autocast(device, dtype=amp_dtype(device), enabled=precision == "amp"):
        out = layer(*[t for t in inputs.values() if t is not None])
    grad_out = torch.randn(out.shape, generator=g)
    out.backward(grad_out.to(device, out.dtype))

    ref_inputs = {k: None if t is None else t.detach().cpu().double().requires_grad_() for k, t in inputs.items()}
    ref_weight = layer.weight.detach().cpu().double().requires_grad_()
    ref_bias = None if layer.bias is None else layer.bias.detach().cpu().double()
    ref = deform_conv2d_by_gather(
        ref_inputs["x"], ref_inputs["offset"], ref_weight, ref_bias, padding=1, mask=ref_inputs["mask"]
    )
    ref.backward(grad_out.double())
    errors = {"output": relative_error(out, ref), "grad weight": relative_error(layer.weight.grad, ref_weight.grad)}
    for k, t in inputs.items():
        if t is not None:
            errors[f"grad {k}"] = relative_error(t.grad, ref_inputs[k].grad)
    worst = max(errors.values())
    return {"errors": errors, "max_rel_error": worst, "ok": worst < KERNEL_TOLERANCE[precision]}


def check_kernels(s):
    """Every layer kind x DCN / DCNv2 x fp32 / autocast x NCHW / channels-last (CUDA only)."""
    if s["device"] != "cuda":
        return {"status": "skipped", "reason": "Detectron2's deformable kernels run on CUDA only (--device cpu)"}
    cases = []
    for kind in ("head DeformConv2d", "backbone AnyDeviceDeformConv"):
        for modulated in (False, True):
            for precision in PRECISIONS:
                for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels-last", torch.channels_last)):
                    case = {"layer": kind, "kernel": "DCNv2" if modulated else "DCN",
                            "precision": precision, "memory_format": fmt_name}  # fmt: skip
                    try:
                        case.update(check_kernel(kind, modulated, precision, fmt))
                    except Exception as e:  # a crash of the kernel is this case's result
                        case.update(ok=False, error=f"{type(e).__name__}: {e}")
                    cases.append(case)
    return {"status": "ok" if all(c["ok"] for c in cases) else "failed", "cases": cases}


# ----------------------------------------------------------------------------------------------
# 2. Training iterations


def training_batch(s):
    """`batch` random images of `size` with TRAIN_BOXES random boxes each (fixed seed)."""
    h, w = s["size"]
    g = torch.Generator().manual_seed(0)
    return [
        {"image": (torch.rand(3, h, w, generator=g) * 255).to(s["device"]),
         "instances": random_instances(h, w, TRAIN_BOXES, generator=g)}
        for _ in range(s["batch"])
    ]  # fmt: skip


def train_iterations(model, batch, iters, warmup, amp, device):
    """
    `iters` SGD steps of `model` on `batch`, under autocast + GradScaler when `amp` (as
    Detectron2's AMPTrainer; GradScaler on CUDA only).

    Returns:
        dict: the total loss of each iteration, whether all losses were finite, the median
        seconds per iteration after `warmup` iterations, the steps GradScaler skipped (non-finite
        gradients) and its final scale.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=TRAIN_LR, momentum=0.9, weight_decay=1e-4)
    scaler = torch.amp.GradScaler(device, enabled=amp and device == "cuda")
    ns = SimpleNamespace(device=device, amp=amp)
    losses, seconds, skipped = [], [], 0
    result = {"iterations": iters}
    with EventStorage(0) as storage:
        for i in range(iters):
            storage.iter = i
            sync(device)
            start = time.perf_counter()
            try:
                with autocast(ns):
                    loss_dict = model(batch)
            except NonFiniteLossError as e:
                result.update(losses_finite=False, error=str(e)[:1000], iterations_done=i)
                break
            loss = sum(loss_dict.values())
            scaler.scale(loss).backward()
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            sync(device)
            seconds.append(time.perf_counter() - start)
            losses.append(loss.item())
            skipped += int(scale is not None and scaler.get_scale() < scale)  # backed off
    timed = seconds[warmup:] or seconds
    result.setdefault("iterations_done", len(losses))
    result.setdefault("losses_finite", all(torch.isfinite(torch.tensor(losses)).tolist()))
    result.update(
        loss_per_iteration=losses, first_loss=losses[0] if losses else None,
        last_loss=losses[-1] if losses else None,
        s_per_iter=statistics.median(timed) if timed else None, skipped_steps=skipped,
        grad_scale=float(scaler.get_scale()) if scaler.is_enabled() else None,
    )  # fmt: skip
    result["ok"] = result["losses_finite"] and result["iterations_done"] == iters
    return result


def check_training(s):
    """VFNet R-50 and R-50-DCN, fp32 and AMP, from the same initial weights."""
    results = {}
    batch = training_batch(s)
    for name, opts in TRAINED.items():
        torch.manual_seed(0)
        model = build("VFNet", s["device"], opts).train()
        initial = {k: v.clone() for k, v in model.state_dict().items()}
        results[name] = {}
        for precision in PRECISIONS:
            model.load_state_dict(initial)
            reset_memory(s["device"])
            r = train_iterations(model, batch, s["train_iters"], s["warmup"], precision == "amp", s["device"])
            r["peak_memory_mb"] = benchmark.peak_memory_mb(s["device"])
            results[name][precision] = r
        del model, initial
    return results


# ----------------------------------------------------------------------------------------------
# 3. Speed


def measure_speed(fn, s):
    """`fn` (benchmark.measure_inference or measure_training) of each model, fp32 and AMP."""
    results = {}
    for name in MODELS:
        results[name] = {}
        for precision in PRECISIONS:
            reset_memory(s["device"])
            results[name][precision] = fn(name, namespace(s, precision == "amp"))
    return results


def head_outputs_and_grads(head, features, ns):
    """The head's outputs on `features` under autocast, and its parameters' gradients of their mean."""
    head.zero_grad(set_to_none=True)
    with autocast(ns):
        out = sum(head(features), [])
    sum(x.float().mean() for x in out).backward()
    grads = [p.grad.float().clone() for p in head.parameters() if p.grad is not None]
    head.zero_grad(set_to_none=True)
    return [x.detach().float() for x in out], grads


def measure_head_memory_format(s):
    """
    VFNet's head (R-50 and R-50-DCN) under AMP on the features of one image, NCHW against
    channels-last: forward (no_grad) and forward + backward seconds, and how far the outputs and
    the gradients of the two formats differ (relative; rounding of the AMP dtype only).
    """
    ns = namespace(s, amp=True)
    h, w = s["size"]
    image = (torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255).to(s["device"])
    results = {}
    for name, opts in TRAINED.items():
        torch.manual_seed(0)
        model = build("VFNet", s["device"], opts).eval()
        with torch.no_grad(), autocast(ns):
            features = model.backbone(model.preprocess_image([{"image": image}]).tensor)
            features = [features[f] for f in model.head_in_features]
        head = model.head
        r, outputs = {}, {}
        for fmt_name, fmt in (("nchw", torch.contiguous_format), ("channels-last", torch.channels_last)):
            head.memory_format = fmt

            def forward():
                with torch.no_grad(), autocast(ns):
                    return head(features)

            def forward_backward():
                with autocast(ns):
                    out = head(features)
                sum(x.float().mean() for per_level in out for x in per_level).backward()

            outputs[fmt_name] = head_outputs_and_grads(head, features, ns)
            r[fmt_name] = {"forward_s": benchmark.timed(forward, ns), "forward_backward_s": benchmark.timed(forward_backward, ns)}
        head.memory_format = None
        r["channels-last / nchw"] = {k: r["channels-last"][k] / r["nchw"][k] for k in r["nchw"]}
        for i, what in enumerate(("outputs", "grads")):
            pairs = zip(outputs["channels-last"][i], outputs["nchw"][i])
            r[f"max_rel_diff_{what}"] = max(relative_error(a, b) for a, b in pairs)
        results[name] = r
        del model, head, features
        reset_memory(s["device"])
    return results


# ----------------------------------------------------------------------------------------------
# 4. Report


def measured(result) -> bool:
    """Whether a section's result holds measurements (it is not an error nor skipped)."""
    return isinstance(result, dict) and "error" not in result and "status" not in result


def target_rows(report):
    """Each target: VFNet / FCOS of s/image (inference) and s/iteration (training step)."""
    rows = []
    for what, key in (("inference", "inference"), ("training step", "training_speed")):
        results = report.get(key)
        if not measured(results):
            continue
        for precision in PRECISIONS:
            ratio = results["VFNet"][precision]["total"] / results["FCOS"][precision]["total"]
            rows.append({"what": what, "precision": precision, "vfnet_over_fcos": ratio,
                         "target": TARGETS[what], "met": ratio <= TARGETS[what]})  # fmt: skip
    return rows


def paper_comparison(report):
    inference = report.get("inference")
    if not measured(inference):
        return None
    fps = 1.0 / inference["VFNet"]["fp32"]["total"]
    return {"reference_fps": PAPER_FPS, "reference_gpu": "V100", "vfnet_r50_fp32_fps": fps, "ratio": fps / PAPER_FPS}


def num(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def kernel_lines(k):
    if not k.get("cases"):
        return [f"Deformable CUDA kernels: {k.get('status')} ({k.get('reason', k.get('error', ''))})"]
    rows = [
        [c["layer"], c["kernel"], c["precision"], c["memory_format"], num(c.get("max_rel_error"), ".1e"),
         "ok" if c["ok"] else f"FAILED {c.get('error', '')}"]
        for c in k["cases"]
    ]  # fmt: skip
    title = "Deformable CUDA kernels against the CPU gather kernel (float64), forward and backward"
    return [table(title, ["layer", "kernel", "precision", "input", "max rel. error", "result"], rows)]


def training_lines(t, s):
    h, w = s["size"]
    rows = [
        [name, p, f"{r['iterations_done']}/{r['iterations']}", num(r["first_loss"]), num(r["last_loss"]),
         "yes" if r["losses_finite"] else "NO", r["skipped_steps"], num(r["s_per_iter"])]
        for name, per in t.items() for p, r in per.items()
    ]  # fmt: skip
    title = f"Training, batch {s['batch']}, {h}x{w}, {TRAIN_BOXES} boxes/image, SGD lr {TRAIN_LR}"
    header = ["model", "precision", "iterations", "first loss", "last loss", "finite", "GradScaler skips", "s/iter"]
    return [table(title, header, rows)]


def speed_lines(r, title, unit):
    """One row per model: s and `unit` (1 / s) in fp32 and AMP, fp32 peak memory."""
    rows = []
    for name in MODELS:
        row = [name]
        for p in PRECISIONS:
            row += [num(r[name][p]["total"]), num(1 / r[name][p]["total"], ".2f")]
        rows.append(row + [num(r[name]["fp32"]["peak_memory_mb"], ".0f")])
    return [table(title, ["model", "fp32 s", f"fp32 {unit}", "AMP s", f"AMP {unit}", "fp32 peak MB"], rows)]


def target_lines(targets, dry_run):
    rows = [
        [t["what"], t["precision"], f"{t['vfnet_over_fcos']:.2f}", f"<= {t['target']:.2f}", "met" if t["met"] else "MISSED"]
        for t in targets
    ]  # fmt: skip
    title = "Targets: VFNet / FCOS" + (" (dry run: meaningless)" if dry_run else "")
    return [table(title, ["measure", "precision", "ratio", "target", "result"], rows)] if rows else []


def head_lines(hm):
    rows = []
    for name, r in hm.items():
        for f in ("nchw", "channels-last"):
            rows.append([name, f, num(r[f]["forward_s"], ".4f"), num(r[f]["forward_backward_s"], ".4f")])
        ratio = r["channels-last / nchw"]
        rows.append([name, "channels-last / nchw", num(ratio["forward_s"], ".2f"), num(ratio["forward_backward_s"], ".2f")])
        rows.append([name, "max rel. difference", num(r["max_rel_diff_outputs"], ".1e"), num(r["max_rel_diff_grads"], ".1e")])
    title = "VFNet head under AMP, NCHW against channels-last, median s (difference: outputs, gradients)"
    return [table(title, ["head", "memory format", "forward", "forward + backward"], rows)]


def markdown(report):
    """The Markdown summary of `report`."""
    m, s = report["machine"], report["settings"]
    h, w = s["size"]
    dtype = "float16" if s["device"] == "cuda" else "bfloat16"
    parts = [
        ["# GPU check" + (" (CPU dry run: tiny sizes, not a measurement)" if s["dry_run"] else "")],
        [f"Device: {m.get('gpu') or m['cpu']} ({s['device']}); torch {m['torch']}, CUDA {m['cuda']}, "
         f"cuDNN {m['cudnn']}, Detectron2 {m['detectron2']}. Inputs {h}x{w}, random weights, score "
         f"threshold 0; AMP: autocast to {dtype}."],
    ]  # fmt: skip
    if report.get("kernel_checks"):
        parts.append(kernel_lines(report["kernel_checks"]))
    if measured(report.get("training")):
        parts.append(training_lines(report["training"], s))
    if measured(report.get("inference")):
        parts.append(speed_lines(report["inference"], f"Inference, batch 1, {h}x{w}, median", "images/s"))
    if measured(report.get("training_speed")):
        title = f"Training step, batch {s['batch']}, {h}x{w}, median"
        parts.append(speed_lines(report["training_speed"], title, "iter/s"))
    parts.append(target_lines(report.get("targets", []), s["dry_run"]))
    p = report.get("paper")
    if p:
        parts.append([f"VFNet R-50 fp32: {p['vfnet_r50_fp32_fps']:.1f} images/s against the paper's {PAPER_FPS} "
                      f"on a V100 ({p['ratio']:.2f}x; another GPU, and score threshold 0 here)."])  # fmt: skip
    if measured(report.get("head_memory_format")):
        parts.append(head_lines(report["head_memory_format"]))
    last = [f"{key}: skipped ({r['reason']})" for key, r in report.items()
            if key != "kernel_checks" and isinstance(r, dict) and r.get("status") == "skipped"]  # fmt: skip
    last += [f"ERROR in {e['section']}: {e['error']}" for e in report.get("errors", [])]
    last.append(f"Elapsed: {report.get('elapsed_s', 0):.0f} s; result: {'ok' if report.get('ok') else 'FAILED'}.")
    parts.append(last)
    return "\n\n".join("\n".join(lines) for lines in parts if lines) + "\n"


def failures(report):
    """The names of the checks that failed (errors, kernel errors, non-finite losses)."""
    bad = [e["section"] for e in report["errors"]]
    if report.get("kernel_checks", {}).get("status") == "failed":
        bad.append("kernels")
    t = report.get("training")
    if measured(t):
        bad += [f"training {n} {p}" for n, per in t.items() for p, r in per.items() if not r["ok"]]
    return bad


def run_gpu_check(args):
    """
    Run every section that `args` (tools/gpu_check.py's) does not skip, each guarded: an error
    is recorded and the next section runs; a section that would start after `budget_s` seconds
    is skipped. Prints the Markdown summary, writes --json and --markdown.

    Returns:
        The report (a dict); report["ok"] is False when a check failed.
    """
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("No CUDA device: run with --device cpu for a dry run.")
    s = settings(args)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    start = time.perf_counter()
    report = {"machine": describe_machine(s["device"]), "settings": s, "errors": [], "elapsed_s_by_section": {}}
    sections = {
        "kernels": ("kernel_checks", lambda: check_kernels(s)),
        "training": ("training", lambda: check_training(s)),
        "inference": ("inference", lambda: measure_speed(measure_inference, s)),
        "training-speed": ("training_speed", lambda: measure_speed(measure_training, s)),
        "head": ("head_memory_format", lambda: measure_head_memory_format(s)),
    }
    for section, (key, fn) in sections.items():
        elapsed = time.perf_counter() - start
        if section in s["skip"]:
            report[key] = {"status": "skipped", "reason": "--skip"}
            continue
        if elapsed > s["budget_s"]:
            report[key] = {"status": "skipped", "reason": f"time budget: {elapsed:.0f} s > {s['budget_s']} s"}
            continue
        print(f"[gpu_check] {section} ({elapsed:.0f} s)", flush=True)
        t0 = time.perf_counter()
        try:
            report[key] = fn()
        except Exception as e:  # recorded; the other sections still run
            report[key] = {"error": f"{type(e).__name__}: {e}"}
            report["errors"].append({"section": section, "error": f"{type(e).__name__}: {e}",
                                     "traceback": traceback.format_exc()[-4000:]})  # fmt: skip
        report["elapsed_s_by_section"][section] = time.perf_counter() - t0
        reset_memory(s["device"])
    report["targets"] = target_rows(report)
    report["paper"] = paper_comparison(report)
    report["elapsed_s"] = time.perf_counter() - start
    report["failures"] = failures(report)
    report["ok"] = not report["failures"]
    text = markdown(report)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return report
