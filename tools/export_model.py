#!/usr/bin/env python
"""
Export a trained VFNet to TorchScript, ONNX or OpenVINO with Detectron2's tracing
(`TracingAdapter`, the "tracing" method of Detectron2's tools/deploy/export_model.py). The
exported graph takes one resized image and returns its final detections (post-processing and NMS
included); see `vfnet/export/` for the interface.

    python tools/export_model.py --config-file configs/VFNet_R_50_FPN_1x.yaml \
        --format onnx --output exported/ MODEL.WEIGHTS output/model_final.pth
    python tools/export_model.py --config-file CONFIG --format torchscript --output exported/ \
        --sample-image image.jpg MODEL.WEIGHTS model_final.pth
    python tools/export_model.py --config-file CONFIG --format openvino --run-eval \
        --output exported/ MODEL.WEIGHTS model_final.pth

Writes OUTPUT/model.ts, OUTPUT/model.onnx or OUTPUT/model.xml (+ model.bin), and
OUTPUT/export_info.json (inputs, outputs, test resize, pixel format, class names) which
`vfnet.export.ExportedPredictor` reads.
"""
import argparse
import logging

from detectron2.utils.logger import setup_logger

import vfnet
from vfnet import export as vfnet_export

logger = logging.getLogger("vfnet.export_model")


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Export a VFNet to TorchScript, ONNX or OpenVINO (tracing, post-processing included)."
    )
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to config file")
    parser.add_argument(
        "--format", choices=sorted(vfnet_export.FILENAMES), default="torchscript", help="output format"
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
        "--runtime",
        choices=vfnet_export.RUNTIMES,
        default=None,
        help="runtime of the check against the eager model and of --run-eval (default: torch for "
        "TorchScript, onnxruntime for ONNX, OpenVINO for OpenVINO; ONNX runs in OpenVINO too)",
    )
    parser.add_argument(
        "opts",
        help="config overrides as KEY VALUE pairs, e.g. MODEL.WEIGHTS model_final.pth",
        default=None,
        nargs=argparse.REMAINDER,
    )
    return parser


def main(argv=None):
    args = get_parser().parse_args(argv)
    setup_logger(name="vfnet")
    setup_logger(name="fvcore")
    setup_logger()
    logger.info("Command line arguments: %s", args)
    for spec in args.dataset:
        vfnet.register_coco_dataset(spec)
    cfg = vfnet_export.setup_cfg(args.config_file, args.opts, args.deform_conv)
    return vfnet_export.export_model(
        cfg, args.output, args.format, args.sample_image, args.opset, args.run_eval, args.runtime
    )


if __name__ == "__main__":
    main()
