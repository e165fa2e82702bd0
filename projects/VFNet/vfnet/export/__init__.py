"""
Export a VFNet to TorchScript, ONNX and OpenVINO by tracing it with Detectron2's
`TracingAdapter` (the "tracing" method of Detectron2's tools/deploy/export_model.py),
post-processing included: the exported graph takes one image and returns its final detections
(score threshold, per-level top-k, class-wise NMS and the detections-per-image cut of the config,
all inside the graph). OpenVINO's format is converted from the ONNX graph (:func:`export_openvino`);
:mod:`.runtime` runs each format (torch, onnxruntime, OpenVINO).

Graph interface (the same for all formats):

* input ``image``: (3, H, W) float32, pixel values 0-255 in ``cfg.INPUT.FORMAT`` channel order
  (BGR for the project's configs), already resized as Detectron2 does at test time
  (`ResizeShortestEdge(MIN_SIZE_TEST, MAX_SIZE_TEST)`); any H and W (the graph pads to the
  backbone's size divisibility itself). One image: no batch dimension.
* outputs, in this order: ``boxes`` (R, 4) float32 XYXY in the input image's pixels, ``classes``
  (R,) int64, ``scores`` (R,) float32, sorted by decreasing score, and ``image_size`` (2,) int64
  (H, W of the input).

A model with soft-NMS (MODEL.VFNET.TEST_NMS_TYPE "soft_nms", VFNet-X) is exported up to the
candidates before the NMS (`VFNet.inference_candidates`: score threshold, per-level top-k, clipped
non-empty boxes), in the same four outputs: soft-NMS runs a data-dependent number of selection
steps, which a trace would fix to those of the traced image. Its arguments (IoU threshold,
method, sigma, minimum score, detections per image) are stored in the exported file itself
(:data:`POST_PROCESSING_KEY`: a TorchScript extra file, ONNX metadata, which OpenVINO keeps) and in
export_info.json; `ExportedPredictor` reads them and applies `batched_soft_nms` to the graph's
outputs, so that it returns the eager model's detections. A runtime without this package applies
the soft-NMS of those arguments itself (MMCV's `soft_nms` per class is the same algorithm).

The deformable convolutions of the head are traced in the kernel their `impl` names: "sampling"
(`grid_sample` + `matmul`) exports to plain ONNX operators (GridSample from opset 16, MatMul);
"torchvision" (`torchvision::deform_conv2d`) exports to the ONNX operator DeformConv (opset 19)
through the symbolic :func:`register_deform_conv_onnx_symbolic` registers. Detectron2's CUDA kernel
(the "auto" choice on GPU) is not traceable: pick one of the two before exporting
(:func:`set_deform_conv_impl`). The deformable convs of a DCN backbone
(MODEL.RESNETS.DEFORM_ON_PER_STAGE) run torchvision's kernel on the CPU, so such a model is
traced on the CPU and its ONNX graph holds DeformConv (opset 19) whatever the head's kernel.

OpenVINO reads both ONNX graphs: ONNX DeformConv through the conversion rule
:func:`openvino_core` adds (its ONNX frontend has none), see :mod:`.runtime`.

:func:`export_model` is what tools/export_model.py runs: the config's model with its weights,
exported to OUTPUT/model.ts, model.onnx or model.xml with OUTPUT/export_info.json (the interface,
test resize, pixel format, class names) beside it, which `ExportedPredictor` reads; then checked
against the eager model on the traced image, and optionally evaluated on DATASETS.TEST[0].

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
The default exporter of PyTorch >= 2.9 (``dynamo=True``, through `torch.export`) cannot capture
Detectron2's post-processing: its data-dependent shapes (score threshold, top-k, NMS) meet Python
branches in `detectron2.structures` (GuardOnDataDependentSymNode).
"""
from .api import FILENAMES, export_model, export_openvino, setup_cfg
from .deform_conv import (
    DEFAULT_ONNX_OPSET,
    DEFORM_CONV_ONNX_OPSET,
    EXPORTABLE_DEFORM_CONV_IMPLS,
    deform_conv_impls,
    deform_conv_onnx_translation_table,
    register_deform_conv_onnx_symbolic,
    set_deform_conv_impl,
)
from .predictor import ExportedPredictor, outputs_to_instances, resize_for_test
from .runtime import (
    OPENVINO_PRECISIONS,
    RUNTIMES,
    Runtime,
    open_runtime,
    openvino_core,
    read_openvino_model,
    save_openvino,
)
from .tracing import (
    INPUT_NAMES,
    OUTPUT_NAMES,
    POST_PROCESSING_KEY,
    apply_post_processing,
    export_onnx,
    export_torchscript,
    post_processing,
    trace_adapter,
)

__all__ = [
    "DEFAULT_ONNX_OPSET",
    "DEFORM_CONV_ONNX_OPSET",
    "EXPORTABLE_DEFORM_CONV_IMPLS",
    "ExportedPredictor",
    "FILENAMES",
    "INPUT_NAMES",
    "OPENVINO_PRECISIONS",
    "OUTPUT_NAMES",
    "POST_PROCESSING_KEY",
    "RUNTIMES",
    "Runtime",
    "apply_post_processing",
    "deform_conv_impls",
    "deform_conv_onnx_translation_table",
    "export_model",
    "export_onnx",
    "export_openvino",
    "export_torchscript",
    "open_runtime",
    "openvino_core",
    "outputs_to_instances",
    "post_processing",
    "read_openvino_model",
    "register_deform_conv_onnx_symbolic",
    "resize_for_test",
    "save_openvino",
    "set_deform_conv_impl",
    "setup_cfg",
    "trace_adapter",
]
