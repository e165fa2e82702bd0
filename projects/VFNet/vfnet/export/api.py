"""
Exporting the model of a config (what tools/export_model.py runs): its weights loaded, traced,
written with export_info.json, checked against the eager model, optionally evaluated.
"""
import json
import logging
import os
import tempfile
from typing import List, Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, detection_utils
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager

from ..checkpoint.detection_checkpoint import VFNetCheckpointer
from ..config import add_vfnet_config
from .deform_conv import deform_conv_impls
from .predictor import ExportedPredictor, resize_for_test
from .runtime import save_openvino
from .tracing import OUTPUT_NAMES, export_onnx, export_torchscript, post_processing

logger = logging.getLogger(__name__)

# The exported model's file name in the output folder, per format (OpenVINO: model.bin beside it).
FILENAMES = {"torchscript": "model.ts", "onnx": "model.onnx", "openvino": "model.xml"}


def setup_cfg(config_file: str, opts: Optional[Sequence[str]] = None, deform_conv: str = "sampling"):
    """
    The frozen config to export: `config_file`, then the overrides `opts` (KEY VALUE pairs), with
    the head's deformable convs in the kernel `deform_conv`, no data-loading workers, and the CPU
    when the config asks for CUDA and there is none.
    """
    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts or []))
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.VFNET.DEFORM_CONV_IMPL = deform_conv
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: exporting on the CPU.")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def sample_image(cfg, path: Optional[str] = None) -> Tensor:
    """The (3, H, W) float tensor to trace on: `path` resized for the test, or a random image."""
    if path is not None:
        image = detection_utils.read_image(path, format="BGR")
    else:
        size = cfg.INPUT.MIN_SIZE_TEST
        width = min(cfg.INPUT.MAX_SIZE_TEST, size * 4 // 3)
        image = np.random.RandomState(0).randint(0, 256, (size, width, 3), dtype=np.uint8)
    return resize_for_test(image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT)


def class_names(cfg) -> Optional[List[str]]:
    """Class names of DATASETS.TEST[0]: its metadata, or the categories of its COCO JSON."""
    if not len(cfg.DATASETS.TEST):
        return None
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    if meta.get("thing_classes") is None and meta.get("json_file") and os.path.isfile(meta.json_file):
        with open(meta.json_file) as f:
            categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
        return [c["name"] for c in categories] or None
    return meta.get("thing_classes")


def export_info(cfg, fmt: str, opset: Optional[int], kernels, post: Optional[dict] = None) -> dict:
    """The contents of export_info.json for the model of `cfg` exported as `fmt`."""
    return {
        "format": fmt,
        "file": FILENAMES[fmt],
        "inputs": {"image": "(3, H, W) float32, 0-255, channel order input_format, resized"},
        "outputs": list(OUTPUT_NAMES),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "deform_conv": cfg.MODEL.VFNET.DEFORM_CONV_IMPL,
        "deform_conv_kernels": sorted(kernels),
        "onnx_opset": opset,
        "device": cfg.MODEL.DEVICE,
        "score_thresh": cfg.MODEL.VFNET.TEST_SCORE_THRESH,
        "nms_thresh": cfg.MODEL.VFNET.TEST_NMS_THRESH,
        "detections_per_image": cfg.MODEL.VFNET.TEST_DETECTIONS_PER_IMAGE,
        # What the graph leaves out (soft-NMS), applied by ExportedPredictor; null: nothing.
        "post_processing": post,
        "num_classes": cfg.MODEL.VFNET.NUM_CLASSES,
        "class_names": class_names(cfg),
        "weights": cfg.MODEL.WEIGHTS,
    }


def compare_with_eager(model: nn.Module, predictor: ExportedPredictor, image: Tensor):
    """Detections of the eager model and of the exported one on `image`: count, max box error."""
    with torch.no_grad():
        eager = model([{"image": image.to(model.device)}])[0]["instances"].to("cpu")
    exported = predictor.run(image)
    if len(eager) != len(exported):
        return len(eager), len(exported), float("inf")
    if len(eager) == 0:
        return 0, 0, 0.0
    err = (eager.pred_boxes.tensor - exported.pred_boxes.tensor).abs().max().item()
    if not torch.equal(eager.pred_classes, exported.pred_classes):
        err = float("inf")
    return len(eager), len(exported), err


def evaluate_exported(cfg, predictor: ExportedPredictor, output_dir: str):
    """COCO metrics of the exported model on DATASETS.TEST[0] (printed, and returned)."""
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format

    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset)
    evaluator = COCOEvaluator(dataset, output_dir=output_dir)
    metrics = inference_on_dataset(predictor.inference, loader, evaluator)
    print_csv_format(metrics)
    return metrics


def export_openvino(model: nn.Module, image: Tensor, path: str, opset_version: Optional[int] = None) -> int:
    """
    Export `model` as :func:`export_onnx` does, then convert the ONNX graph into OpenVINO's
    format: `path` (.xml) and its .bin. (OpenVINO's own conversion of the traced PyTorch model
    gives other detections: it pads the image to a wrong size, see docs/GETTING_STARTED.md.)

    Returns:
        the ONNX opset used.
    """
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = os.path.join(tmp, "model.onnx")
        opset = export_onnx(model, image, onnx_path, opset_version)
        save_openvino(onnx_path, path)
    return opset


def export_model(
    cfg,
    output_dir: str,
    fmt: str = "torchscript",
    sample_image_path: Optional[str] = None,
    opset: Optional[int] = None,
    run_eval: bool = False,
    runtime: Optional[str] = None,
):
    """
    Export the model of `cfg` (see :func:`setup_cfg`) with its MODEL.WEIGHTS as `fmt`
    ("torchscript", "onnx" or "openvino" (through ONNX), ONNX opset `opset`, default as
    :func:`export_onnx`) to `output_dir`, traced on `sample_image_path` (default: a random image
    of the test size), and write export_info.json beside it. Then run the exported model in
    `runtime` (default: by its format, see :func:`open_runtime`) on the traced image and log
    how it compares with the eager model; with `run_eval` evaluate it on DATASETS.TEST[0].

    Returns:
        the COCO metrics with `run_eval`, else the contents of export_info.json; None when the
        exported model cannot be run (its runtime is not installed).
    """
    PathManager.mkdirs(output_dir)
    model = build_model(cfg)
    VFNetCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    image = sample_image(cfg, sample_image_path).to(model.device)

    path = os.path.join(output_dir, FILENAMES[fmt])
    used_opset = None
    if fmt == "torchscript":
        export_torchscript(model, image, path)
    elif fmt == "onnx":
        used_opset = export_onnx(model, image, path, opset)
    else:
        used_opset = export_openvino(model, image, path, opset)
    info = export_info(cfg, fmt, used_opset, deform_conv_impls(model), post_processing(model))
    with open(os.path.join(output_dir, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    logger.info("Exported %s (%s deformable convs) to %s", fmt, cfg.MODEL.VFNET.DEFORM_CONV_IMPL, path)

    try:
        predictor = ExportedPredictor(path, device=cfg.MODEL.DEVICE, runtime=runtime)
    except ImportError as e:  # onnxruntime or openvino missing
        logger.warning("Cannot check the exported model: %s", e)
        return None
    num_eager, num_exported, err = compare_with_eager(model, predictor, image.cpu())
    msg = (
        f"sample image: eager model {num_eager} detections, exported ({predictor.runtime.name}) "
        f"{num_exported}, max box difference {err:.2e}"
    )
    if num_eager != num_exported or err > 1e-2:
        logger.warning("The exported model differs from the eager one on the %s", msg)
    else:
        logger.info("Checked the exported model on the %s", msg)

    if run_eval:
        return evaluate_exported(cfg, predictor, output_dir)
    return info
