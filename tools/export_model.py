#!/usr/bin/env python
"""
Export a trained VFNet to TorchScript or ONNX with Detectron2's tracing (`TracingAdapter`, the
"tracing" method of Detectron2's tools/deploy/export_model.py). The exported graph takes one
resized image and returns its final detections (post-processing and NMS included); see
`vfnet/export.py` for the interface.

    python tools/export_model.py --config-file configs/VFNet_R_50_FPN_1x.yaml \
        --format onnx --output exported/ MODEL.WEIGHTS output/model_final.pth
    python tools/export_model.py --config-file CONFIG --format torchscript --output exported/ \
        --sample-image image.jpg MODEL.WEIGHTS model_final.pth

Writes OUTPUT/model.ts or OUTPUT/model.onnx, and OUTPUT/export_info.json (inputs, outputs, test
resize, pixel format, class names) which `vfnet.export.ExportedPredictor` reads.
"""
import argparse
import json
import logging
import os
import numpy as np
import torch

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, detection_utils
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import setup_logger

import vfnet
from vfnet import export as vfnet_export

logger = logging.getLogger("vfnet.export_model")

FILENAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a VFNet to TorchScript or ONNX (tracing, post-processing included)."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--format", choices=sorted(FILENAMES), default="torchscript", help="output format"
    )
    parser.add_argument("--output", required=True, help="output directory for the exported model")
    parser.add_argument(
        "--sample-image",
        default=None,
        help="image to trace the model on (default: a random image of the test size; the "
        "exported graph takes any image size either way)",
    )
    parser.add_argument(
        "--deform-conv",
        choices=vfnet_export.EXPORTABLE_DEFORM_CONV_IMPLS,
        default="sampling",
        help="kernel of the head's deformable convs in the exported graph: 'sampling' "
        "(grid_sample + matmul: plain ONNX GridSample/MatMul, aten ops in TorchScript) or "
        "'torchvision' (ONNX DeformConv, opset 19; torchvision::deform_conv2d in TorchScript). "
        "A DCN backbone's deformable convs are torchvision's either way (CPU only)",
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help=f"ONNX opset (default {vfnet_export.DEFAULT_ONNX_OPSET}, "
        f"{vfnet_export.DEFORM_CONV_ONNX_OPSET} with --deform-conv torchvision)",
    )
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset under NAME (repeatable), for the class names of "
        "DATASETS.TEST[0] and --run-eval",
    )
    parser.add_argument(
        "--run-eval",
        action="store_true",
        help="evaluate the exported model on DATASETS.TEST[0] with COCOEvaluator",
    )
    parser.add_argument(
        "opts",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def setup_cfg(args):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts or [])
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.MODEL.VFNET.DEFORM_CONV_IMPL = args.deform_conv
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: exporting on the CPU.")
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    return cfg


def sample_image(cfg, path=None) -> torch.Tensor:
    """The (3, H, W) float tensor to trace on: `path` resized for the test, or a random image."""
    if path is not None:
        image = detection_utils.read_image(path, format="BGR")
    else:
        size = cfg.INPUT.MIN_SIZE_TEST
        width = min(cfg.INPUT.MAX_SIZE_TEST, size * 4 // 3)
        image = np.random.RandomState(0).randint(0, 256, (size, width, 3), dtype=np.uint8)
    return vfnet_export.resize_for_test(
        image, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, cfg.INPUT.FORMAT
    )


def class_names(cfg):
    """Class names of DATASETS.TEST[0]: its metadata, or the categories of its COCO JSON."""
    if not len(cfg.DATASETS.TEST):
        return None
    meta = MetadataCatalog.get(cfg.DATASETS.TEST[0])
    if meta.get("thing_classes") is None and meta.get("json_file") and os.path.isfile(meta.json_file):
        with open(meta.json_file) as f:
            categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
        return [c["name"] for c in categories] or None
    return meta.get("thing_classes")


def export_info(cfg, args, opset, kernels):
    return {
        "format": args.format,
        "file": FILENAMES[args.format],
        "inputs": {"image": "(3, H, W) float32, 0-255, channel order input_format, resized"},
        "outputs": list(vfnet_export.OUTPUT_NAMES),
        "input_format": cfg.INPUT.FORMAT,
        "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
        "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        "deform_conv": args.deform_conv,
        "deform_conv_kernels": sorted(kernels),
        "onnx_opset": opset,
        "device": cfg.MODEL.DEVICE,
        "score_thresh": cfg.MODEL.VFNET.TEST_SCORE_THRESH,
        "nms_thresh": cfg.MODEL.VFNET.TEST_NMS_THRESH,
        "detections_per_image": cfg.MODEL.VFNET.TEST_DETECTIONS_PER_IMAGE,
        "num_classes": cfg.MODEL.VFNET.NUM_CLASSES,
        "class_names": class_names(cfg),
        "weights": cfg.MODEL.WEIGHTS,
    }


def compare(model, predictor, image):
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


def run_eval(cfg, predictor, output_dir):
    from detectron2.data import build_detection_test_loader
    from detectron2.evaluation import COCOEvaluator, inference_on_dataset, print_csv_format

    dataset = cfg.DATASETS.TEST[0]
    loader = build_detection_test_loader(cfg, dataset)
    evaluator = COCOEvaluator(dataset, output_dir=output_dir)
    metrics = inference_on_dataset(predictor.inference, loader, evaluator)
    print_csv_format(metrics)
    return metrics


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="vfnet")
    setup_logger(name="fvcore")
    setup_logger()
    logger.info("Command line arguments: %s", args)
    for spec in args.dataset:
        vfnet.register_coco_dataset(spec)
    cfg = setup_cfg(args)
    PathManager.mkdirs(args.output)

    model = build_model(cfg)
    DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    image = sample_image(cfg, args.sample_image).to(model.device)

    path = os.path.join(args.output, FILENAMES[args.format])
    opset = None
    if args.format == "torchscript":
        vfnet_export.export_torchscript(model, image, path)
    else:
        opset = vfnet_export.export_onnx(model, image, path, args.opset)
    info = export_info(cfg, args, opset, vfnet_export.deform_conv_impls(model))
    with open(os.path.join(args.output, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    logger.info("Exported %s (%s deformable convs) to %s", args.format, args.deform_conv, path)

    try:
        predictor = vfnet_export.ExportedPredictor(path, device=cfg.MODEL.DEVICE)
    except ImportError as e:  # onnxruntime missing
        logger.warning("Cannot check the exported model: %s", e)
        return None
    num_eager, num_exported, err = compare(model, predictor, image.cpu())
    msg = f"sample image: eager model {num_eager} detections, exported {num_exported}, max box difference {err:.2e}"
    if num_eager != num_exported or err > 1e-2:
        logger.warning("The exported model differs from the eager one on the %s", msg)
    else:
        logger.info("Checked the exported model on the %s", msg)

    if args.run_eval:
        return run_eval(cfg, predictor, args.output)
    return info


if __name__ == "__main__":
    main()
