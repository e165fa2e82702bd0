"""
Tracing a VFNet with Detectron2's `TracingAdapter` into TorchScript and ONNX, post-processing
included (or, with soft-NMS, up to the candidates before it: :func:`post_processing`).
"""
import contextlib
import json
import warnings
from typing import Optional

import torch
from torch import Tensor, nn

from detectron2.export import TracingAdapter
from detectron2.structures import Instances

from ..modeling.meta_arch.vfnet import class_wise_nms
from .deform_conv import (
    DEFAULT_ONNX_OPSET,
    DEFORM_CONV_ONNX_OPSET,
    check_exportable,
    register_deform_conv_onnx_symbolic,
)


INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("boxes", "classes", "scores", "image_size")
# The name of the post-processing left out of the graph (JSON, :func:`post_processing`) in the
# exported file: a TorchScript extra file, an ONNX metadata property.
POST_PROCESSING_KEY = "vfnet_post_processing.json"


def _inference(model: nn.Module, image: Tensor) -> Instances:
    # The meta-architecture's own forward, post-processing included; without "height"/"width"
    # the detections are in the coordinates of `image`.
    return model([{"image": image}])[0]["instances"]


def _inference_candidates(model: nn.Module, image: Tensor) -> Instances:
    # The detections before the class-wise NMS, in the coordinates of `image`.
    return model.inference_candidates([{"image": image}])[0]


def post_processing(model: nn.Module) -> Optional[dict]:
    """
    The post-processing of `model` that its exported graph leaves out: None when the graph holds
    it all (NMS), else {"type": "soft_nms", "iou_threshold", "method", "sigma", "min_score",
    "detections_per_image"} (MODEL.VFNET.TEST_NMS_TYPE "soft_nms", see the module docstring).
    """
    soft_nms = getattr(model, "test_soft_nms", None)
    if soft_nms is None:
        return None
    return {
        "type": "soft_nms",
        "iou_threshold": model.test_nms_thresh,
        **soft_nms,
        "detections_per_image": model.max_detections_per_image,
    }


def apply_post_processing(inst: Instances, spec: Optional[dict]) -> Instances:
    """The detections of `inst` (the graph's outputs) after the post-processing `spec` left out."""
    if spec is None:
        return inst
    if spec.get("type") != "soft_nms":
        raise ValueError(f"Unknown post-processing {spec.get('type')!r} in the exported model ({POST_PROCESSING_KEY}).")
    args = {k: spec[k] for k in ("method", "sigma", "min_score")}
    keep, scores = class_wise_nms(
        inst.pred_boxes.tensor, inst.scores, inst.pred_classes, spec["iou_threshold"],
        spec["detections_per_image"], args,
    )  # fmt: skip
    inst = inst[keep]
    inst.scores = scores
    return inst


def trace_adapter(model: nn.Module, image: Tensor) -> TracingAdapter:
    """
    A `TracingAdapter` around `model` (in eval mode) that maps one (3, H, W) image tensor to the
    flat tuple (boxes, classes, scores, image_size): the detections, or for a model with
    soft-NMS the candidates before it (:func:`post_processing`).
    """
    check_exportable(model)
    model.eval()
    fn = _inference if post_processing(model) is None else _inference_candidates
    return TracingAdapter(model, image, fn).eval()


def _check_outputs(adapter: TracingAdapter) -> None:
    """After tracing: the outputs are the flat Instances (boxes, classes, scores, image_size)."""
    schema = adapter.outputs_schema
    if getattr(schema, "keys", None) != ["pred_boxes", "pred_classes", "scores"]:
        raise RuntimeError(f"Unexpected outputs of the model: {schema}.")


@contextlib.contextmanager
def _quiet_tracing():
    """
    Silence the TracerWarnings of Detectron2's asserts and emptiness checks (constant in the
    trace, harmless), and the deprecation notices of the TorchScript-based exporter.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", message=".*torch.jit.script.* is deprecated.*")
        warnings.filterwarnings("ignore", message=".*torch.meshgrid.*indexing.*")
        yield


def export_torchscript(model: nn.Module, image: Tensor, path: Optional[str] = None) -> torch.jit.ScriptModule:
    """
    Trace `model` on `image` ((3, H, W) float tensor, resized for the test) into TorchScript, and
    save it to `path` when given.

    The traced module runs on the device it was traced on; a model traced with "torchvision"
    deformable convs needs torchvision's operators loaded (``import torchvision``).
    """
    adapter = trace_adapter(model, image)
    with _quiet_tracing():
        traced = torch.jit.trace(adapter, (image,), check_trace=False)
    _check_outputs(adapter)
    if path is not None:
        extra = {POST_PROCESSING_KEY: json.dumps(post_processing(model))}
        torch.jit.save(traced, path, _extra_files=extra)
    return traced


def export_onnx(model: nn.Module, image: Tensor, path: str, opset_version: Optional[int] = None) -> int:
    """
    Trace `model` on `image` into an ONNX file `path` with dynamic height and width.

    Args:
        opset_version: default :data:`DEFAULT_ONNX_OPSET` (17), or
            :data:`DEFORM_CONV_ONNX_OPSET` (19) when the model has "torchvision" deformable convs,
            which export to ONNX DeformConv.

    Returns:
        the opset used.
    """
    impls = check_exportable(model)
    if opset_version is None:
        opset_version = DEFORM_CONV_ONNX_OPSET if "torchvision" in impls else DEFAULT_ONNX_OPSET
    if "torchvision" in impls:
        register_deform_conv_onnx_symbolic(opset_version)
    elif opset_version < 16:
        raise ValueError(f"The 'sampling' deformable convs need ONNX GridSample: opset >= 16, got {opset_version}.")
    adapter = trace_adapter(model, image)
    dynamic_axes = {"image": {1: "height", 2: "width"}}
    dynamic_axes.update({name: {0: "detections"} for name in OUTPUT_NAMES[:3]})
    with _quiet_tracing():
        torch.onnx.export(
            adapter,
            (image,),
            path,
            dynamo=False,  # see the module docstring
            opset_version=opset_version,
            input_names=list(INPUT_NAMES),
            output_names=list(OUTPUT_NAMES),
            dynamic_axes=dynamic_axes,
        )
    _check_outputs(adapter)
    spec = post_processing(model)
    if spec is not None:
        import onnx

        graph = onnx.load(path)
        entry = graph.metadata_props.add()
        entry.key, entry.value = POST_PROCESSING_KEY, json.dumps(spec)
        onnx.save(graph, path)
    return opset_version
