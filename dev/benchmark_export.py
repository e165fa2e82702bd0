"""
VFNet on the CPU runtimes it deploys to, side by side (what tools/benchmark_export.py runs):
eager PyTorch fp32 and bf16 (autocast), TorchScript, onnxruntime and OpenVINO on each exported
graph (the head's deformable convs as GridSample + MatMul, or as ONNX DeformConv), OpenVINO in
bf16 where the CPU has it and in int8 (NNCF post-training quantization), eager and batched;
Detectron2's FCOS exported the same way as the reference. Median s/image and peak RSS of each in
a fresh process, and the COCO AP of each on a dataset. Imports Detectron2.
"""
import json
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from types import SimpleNamespace

import torch

from detectron2.config import instantiate
from detectron2.data import DatasetCatalog, build_detection_test_loader, detection_utils
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model

from vfnet import export as E
from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer
from vfnet.data.datasets import register_coco_dataset

from .benchmark import machine, peak_memory_mb, table, timed

# Each row of the table: (name, model, runtime, exported file or None, options).
#   model: "VFNet" (the config's) or "FCOS" (Detectron2's LazyConfig, random weights)
#   file: the export it runs (see EXPORTS), None for the eager model
ROWS = {
    "eager fp32": ("VFNet", "eager", None, {}),
    "eager bf16": ("VFNet", "eager", None, {"bf16": True}),
    "TorchScript": ("VFNet", "torchscript", "sampling.ts", {}),
    "onnxruntime (GridSample)": ("VFNet", "onnxruntime", "sampling.onnx", {}),
    "onnxruntime (DeformConv)": ("VFNet", "onnxruntime", "deformconv.onnx", {}),
    "OpenVINO fp32 (GridSample)": ("VFNet", "openvino", "sampling.xml", {}),
    "OpenVINO fp32 (DeformConv)": ("VFNet", "openvino", "deformconv.xml", {}),
    "OpenVINO bf16 (GridSample)": ("VFNet", "openvino", "sampling.xml", {"precision": "bf16"}),
    "OpenVINO bf16 (DeformConv)": ("VFNet", "openvino", "deformconv.xml", {"precision": "bf16"}),
    "OpenVINO int8 (GridSample)": ("VFNet", "openvino", "sampling-int8.xml", {}),
    "OpenVINO int8 (DeformConv)": ("VFNet", "openvino", "deformconv-int8.xml", {}),
    "FCOS eager fp32": ("FCOS", "eager", None, {}),
    "FCOS onnxruntime": ("FCOS", "onnxruntime", "fcos.onnx", {}),
    "FCOS OpenVINO fp32": ("FCOS", "openvino", "fcos.xml", {}),
}
# How each file is made: (model, format, head's deformable convs).
EXPORTS = {
    "sampling.ts": ("VFNet", "torchscript", "sampling"),
    "sampling.onnx": ("VFNet", "onnx", "sampling"),
    "deformconv.onnx": ("VFNet", "onnx", "torchvision"),
    "sampling.xml": ("VFNet", "openvino", "sampling"),
    "deformconv.xml": ("VFNet", "openvino", "torchvision"),
    "fcos.onnx": ("FCOS", "onnx", None),
    "fcos.xml": ("FCOS", "openvino", None),
}


# ----------------------------------------------------------------------------------------------
# Models, files and inputs (in the worker processes)


def build(name, args, deform_conv="auto", bf16=False):
    """
    The eager model `name` in eval mode: the VFNet of --config-file with --weights (random ones
    without: then a score threshold of 0, every candidate through the post-processing, the worst
    case, as tools/benchmark.py), or Detectron2's FCOS R-50 (random weights, the same threshold).
    """
    from detectron2 import model_zoo  # here, in the worker: its import warns (pkg_resources)

    torch.manual_seed(0)  # the same random weights in every process
    if name == "FCOS":  # Detectron2 has FCOS as a LazyConfig only
        cfg = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py")
        cfg.model.test_score_thresh = 0.0
        return instantiate(cfg.model).eval()
    cfg = vfnet_cfg(args, deform_conv, bf16)
    model = build_model(cfg)
    VFNetCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    return model.eval()


def vfnet_cfg(args, deform_conv="auto", bf16=False):
    """The config of the VFNet rows: --config-file, --weights, the deformable convs' kernel, bf16."""
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", args.weights or "", *args.opts]
    if not args.weights:
        opts += ["MODEL.VFNET.TEST_SCORE_THRESH", "0.0"]
    if bf16:
        opts += ["TEST.AMP.ENABLED", "True", "TEST.AMP.DTYPE", "bfloat16"]
    return E.setup_cfg(args.config_file, opts, deform_conv)


def sample_input(args):
    """
    The (3, H, W) float image every row runs on: a random one of --size H W, or with --images the
    first image of that dataset resized as the test does with --size as (MIN_SIZE_TEST,
    MAX_SIZE_TEST).
    """
    if args.images:
        record = DatasetCatalog.get(args.images)[0]
        image = detection_utils.read_image(record["file_name"], format="BGR")
        return E.resize_for_test(image, *args.size)
    h, w = args.size
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(0)) * 255


def make_export(file, args):
    """Export the file `file` of EXPORTS into args.work_dir (in a worker); returns its path."""
    name, fmt, deform_conv = EXPORTS[file]
    path = os.path.join(args.work_dir, file)
    model = build(name, args, deform_conv or "auto")
    image = sample_input(args)
    if fmt == "torchscript":
        E.export_torchscript(model, image, path)
    elif fmt == "onnx":
        E.export_onnx(model, image, path)
    else:
        E.export_openvino(model, image, path)
    return path


def quantize_int8(file, args):
    """
    OpenVINO int8 of the fp32 IR `file` (``X.xml`` -> ``X-int8.xml``): NNCF's post-training
    quantization, calibrated on the first --calib-size images of --calibration (resized for the
    test). Returns its path.
    """
    import nncf
    import openvino as ov

    if not args.calibration:
        raise ValueError("int8 needs calibration images: --calibration NAME (a registered dataset)")
    records = DatasetCatalog.get(args.calibration)[: args.calib_size]
    cfg = vfnet_cfg(args)
    images = [
        E.resize_for_test(detection_utils.read_image(r["file_name"], format="BGR"), cfg.INPUT.MIN_SIZE_TEST,
                          cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT).numpy()
        for r in records
    ]  # fmt: skip
    model = E.read_openvino_model(os.path.join(args.work_dir, file))
    quantized = nncf.quantize(model, nncf.Dataset(images), subset_size=len(images))
    path = os.path.join(args.work_dir, file.replace(".xml", "-int8.xml"))
    ov.save_model(quantized, path, compress_to_fp16=False)
    return path


# ----------------------------------------------------------------------------------------------
# Measurements (each in a fresh process)


def measure(row, args):
    """
    Median s/image and peak RSS of the row `row` of ROWS on one image; with --batch N, s/image
    over N images at once (eager: one forward of N images; OpenVINO: N streams; the exported
    graphs take one image: N runs); with --eval, COCO box AP on that dataset.
    """
    name, runtime, file, options = ROWS[row]
    image = sample_input(args)
    timing = SimpleNamespace(device="cpu", warmup=args.warmup, iters=args.iters)

    def open_model(streams=None):
        """A function of a list of images (one (3, H, W) tensor each), and the model's interface."""
        if runtime == "eager":
            model = build(name, args, bf16=options.get("bf16", False))

            def run(images):
                with torch.no_grad():
                    return model([{"image": x} for x in images])

            return run, model
        predictor = E.ExportedPredictor(
            os.path.join(args.work_dir, file), runtime=runtime, precision=options.get("precision", "f32"),
            num_threads=args.threads or None, num_streams=streams,
        )  # fmt: skip
        return predictor.runtime.run_all, predictor.inference

    run, model = open_model()
    result = {"s/image": timed(lambda: run([image]), timing), "peak_memory_mb": peak_memory_mb("cpu")}
    if args.eval and name == "VFNet":
        result["AP"] = coco_ap(model, args)
    if args.batch > 1:
        run, _ = open_model(streams=args.batch if runtime == "openvino" else None)
        result["s/image, batch"] = timed(lambda: run([image] * args.batch), timing) / args.batch
    return result


def coco_ap(model, args):
    """COCO box AP of `model` (Detectron2's interface) on --eval, as the config's test loader reads it."""
    loader = build_detection_test_loader(vfnet_cfg(args), args.eval)
    with tempfile.TemporaryDirectory() as out:
        return inference_on_dataset(model, loader, COCOEvaluator(args.eval, output_dir=out))["bbox"]["AP"]


def in_worker(fn, arg, args):
    """fn(arg, args) in a fresh process: its own peak memory, threads and datasets."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn"), initializer=_init_worker, initargs=(args,)) as pool:
        return pool.submit(fn, arg, args).result()


def _init_worker(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    for spec in args.dataset:
        register_coco_dataset(spec, check_files=False)


# ----------------------------------------------------------------------------------------------
# The run


def available_rows(args):
    """The rows of --rows this machine can run: bf16 where the CPU has it natively, int8 with nncf."""
    import importlib.util

    from vfnet.engine.train_loop import has_native_bf16

    rows = []
    for row in args.rows:
        if row == "eager bf16" and not has_native_bf16():
            print(f"skipped '{row}': this CPU has no native bf16 (torch emulates it, slower than fp32)")
            continue
        if "bf16" in row and "OpenVINO" in row:
            if "BF16" not in E.openvino_core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
                print(f"skipped '{row}': this CPU has no bf16 in OpenVINO")
                continue
        if "int8" in row and (importlib.util.find_spec("nncf") is None or not args.calibration):
            print(f"skipped '{row}': int8 needs nncf (pip install nncf) and --calibration")
            continue
        rows.append(row)
    return rows


def run_benchmark(args):
    """Export what the rows of --rows run, measure each row in a fresh process, print the table
    and write --json."""
    for spec in args.dataset:
        register_coco_dataset(spec, check_files=False)
    os.makedirs(args.work_dir, exist_ok=True)
    report = {"machine": machine(), "args": vars(args), "rows": {}}
    print(f"Machine: {report['machine']}\n")
    rows = available_rows(args)
    files = {ROWS[r][2] for r in rows if ROWS[r][2]}
    for file in sorted(files, key=lambda f: ("int8" in f, f)):
        if os.path.isfile(os.path.join(args.work_dir, file)) and not args.export_again:
            continue
        start = time.perf_counter()
        if file.endswith("-int8.xml"):
            base = file.replace("-int8", "")
            if not os.path.isfile(os.path.join(args.work_dir, base)):
                in_worker(make_export, base, args)
            in_worker(quantize_int8, base, args)
        else:
            in_worker(make_export, file, args)
        print(f"made {file} in {time.perf_counter() - start:.0f} s")
    for row in rows:
        try:
            report["rows"][row] = in_worker(measure, row, args)
        except Exception as e:  # a row that fails is reported, the others still run
            report["rows"][row] = {"error": f"{type(e).__name__}: {e}"}
        print(row, report["rows"][row], flush=True)
    print()
    print(results_table(report["rows"], args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return report


def results_table(results, args):
    h, w = args.size
    base = results.get("eager fp32", {}).get("s/image")
    header = ["runtime", "s/image", "speed-up over VFNet eager fp32", "peak RSS MB"]
    header += [f"s/image, batch {args.batch}"] if args.batch > 1 else []
    header += ["AP"] if args.eval else []
    lines = []
    for row, r in results.items():
        if "error" in r:
            lines.append([row, r["error"][:60]] + ["-"] * (len(header) - 2))
            continue
        line = [row, f"{r['s/image']:.3f}", f"{base / r['s/image']:.2f}x" if base else "-", f"{r['peak_memory_mb']:.0f}"]
        line += [f"{r['s/image, batch']:.3f}"] if args.batch > 1 else []
        line += [f"{r['AP']:.2f}" if "AP" in r else "-"] if args.eval else []
        lines.append(line)
    where = f"the first image of '{args.images}'" if args.images else f"{h}x{w}"
    threads = args.threads or torch.get_num_threads()
    return table(f"VFNet inference on the CPU, {where}, {threads} threads, median s/image", header, lines)
