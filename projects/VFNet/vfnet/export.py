"""
Export a VFNet to TorchScript and ONNX by tracing it with Detectron2's `TracingAdapter` (the
"tracing" method of Detectron2's tools/deploy/export_model.py), post-processing included: the
exported graph takes one image and returns its final detections (score threshold, per-level
top-k, class-wise NMS and the detections-per-image cut of the config, all inside the graph).

Graph interface (the same for both formats):

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
(:data:`POST_PROCESSING_KEY`: a TorchScript extra file, ONNX metadata) and in
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

:func:`export_model` is what tools/export_model.py runs: the config's model with its weights,
exported to OUTPUT/model.ts or OUTPUT/model.onnx with OUTPUT/export_info.json (the interface,
test resize, pixel format, class names) beside it, which `ExportedPredictor` reads; then checked
against the eager model on the traced image, and optionally evaluated on DATASETS.TEST[0].

ONNX export uses PyTorch's TorchScript-based exporter (``torch.onnx.export(..., dynamo=False)``).
The default exporter of PyTorch >= 2.9 (``dynamo=True``, through `torch.export`) cannot capture
Detectron2's post-processing: its data-dependent shapes (score threshold, top-k, NMS) meet Python
branches in `detectron2.structures` (GuardOnDataDependentSymNode).
"""
import contextlib
import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Union
import numpy as np
import torch
from torch import Tensor, nn

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, detection_utils
from detectron2.export import TracingAdapter
from detectron2.modeling import build_model
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances
from detectron2.utils.file_io import PathManager

from .config import add_vfnet_config
from .layers.deform_conv import DeformConv2d
from .modeling.meta_arch.vfnet import class_wise_nms

__all__ = [
    "DEFAULT_ONNX_OPSET",
    "DEFORM_CONV_ONNX_OPSET",
    "FILENAMES",
    "OUTPUT_NAMES",
    "POST_PROCESSING_KEY",
    "ExportedPredictor",
    "deform_conv_onnx_translation_table",
    "export_model",
    "export_onnx",
    "export_torchscript",
    "outputs_to_instances",
    "post_processing",
    "register_deform_conv_onnx_symbolic",
    "resize_for_test",
    "set_deform_conv_impl",
    "setup_cfg",
    "trace_adapter",
]

logger = logging.getLogger(__name__)

# GridSample (the "sampling" deformable convs) is in ONNX from opset 16; 17 is the newest opset
# most runtimes support fully.
DEFAULT_ONNX_OPSET = 17
# ONNX DeformConv (the "torchvision" deformable convs) is in ONNX from opset 19.
DEFORM_CONV_ONNX_OPSET = 19
INPUT_NAMES = ("image",)
OUTPUT_NAMES = ("boxes", "classes", "scores", "image_size")
EXPORTABLE_DEFORM_CONV_IMPLS = ("sampling", "torchvision")
# The exported model's file name in the output folder, per format.
FILENAMES = {"torchscript": "model.ts", "onnx": "model.onnx"}
# The name of the post-processing left out of the graph (JSON, :func:`post_processing`) in the
# exported file: a TorchScript extra file, an ONNX metadata property.
POST_PROCESSING_KEY = "vfnet_post_processing.json"


def set_deform_conv_impl(model: nn.Module, impl: str) -> int:
    """
    Make every deformable conv of the VFNet head of `model` run the kernel `impl` ("sampling" or
    "torchvision": the weights are the same tensors for all kernels). The deformable convs of a
    DCN backbone trace as torchvision's on the CPU.

    Returns:
        the number of deformable convs changed.
    """
    if impl not in EXPORTABLE_DEFORM_CONV_IMPLS:
        raise ValueError(f"Cannot export deformable convs '{impl}': use one of {EXPORTABLE_DEFORM_CONV_IMPLS}.")
    layers = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    for m in layers:
        m.impl = impl
    return len(layers)


def deform_conv_impls(model: nn.Module, device: Optional[torch.device] = None) -> set:
    """
    The kernels the deformable convs of `model` run on `device` (default: the model's): those of
    the head ("gather", "sampling", "torchvision", "detectron2"), and of the backbone's DCN stages
    (MODEL.RESNETS.DEFORM_ON_PER_STAGE): torchvision's on CPU, Detectron2's on GPU.
    """
    from detectron2.layers import DeformConv, ModulatedDeformConv

    from .modeling.backbone.resnet_fpn import AnyDeviceDeformConv, AnyDeviceModulatedDeformConv

    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    cuda = torch.device(device).type == "cuda"
    impls = set()
    for m in model.modules():
        if isinstance(m, DeformConv2d):
            impls.add(m.resolved_impl(device))
        elif isinstance(m, (AnyDeviceDeformConv, AnyDeviceModulatedDeformConv)):
            impls.add("detectron2" if cuda else "torchvision")
        elif isinstance(m, (DeformConv, ModulatedDeformConv)):
            impls.add("detectron2")
    return impls


def _check_exportable(model: nn.Module) -> set:
    impls = deform_conv_impls(model)
    bad = impls - set(EXPORTABLE_DEFORM_CONV_IMPLS)
    if bad:
        raise ValueError(
            f"The model's deformable convs run {sorted(bad)}, which cannot be traced: set "
            "MODEL.VFNET.DEFORM_CONV_IMPL to 'sampling' or 'torchvision' (or call "
            "vfnet.export.set_deform_conv_impl) before exporting; a backbone with deformable "
            "convs (MODEL.RESNETS.DEFORM_ON_PER_STAGE) traces on the CPU only (MODEL.DEVICE cpu), "
            "with torchvision's kernel."
        )
    return impls


# ---------------------------------------------------------------------------------------------
# ONNX symbolic of torchvision::deform_conv2d (TorchScript-based exporter)
# ---------------------------------------------------------------------------------------------


def _deform_conv2d_symbolic(
    g,
    input,
    weight,
    offset,
    mask,
    bias,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dilation_h,
    dilation_w,
    groups,
    offset_groups,
    use_mask,
):
    """
    torchvision::deform_conv2d -> ONNX DeformConv (opset 19). Both take the offsets in the same
    layout, (N, offset_groups * kH * kW * 2, oH, oW) with (dy, dx) pairs, and the mask as
    (N, offset_groups * kH * kW, oH, oW); torchvision passes a zero bias when there is none.
    """
    from torch.onnx import symbolic_helper

    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups = (
        symbolic_helper._get_const(v, "i", name)
        for v, name in zip(
            (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups),
            ("stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups", "offset_groups"),
        )
    )
    use_mask = symbolic_helper._get_const(use_mask, "b", "use_mask")
    inputs = [input, weight, offset, bias]
    if use_mask:
        inputs.append(mask)
    return g.op(
        "DeformConv",
        *inputs,
        dilations_i=[dilation_h, dilation_w],
        group_i=groups,
        offset_group_i=offset_groups,
        pads_i=[pad_h, pad_w, pad_h, pad_w],
        strides_i=[stride_h, stride_w],
    )


def register_deform_conv_onnx_symbolic(opset_version: int = DEFORM_CONV_ONNX_OPSET) -> None:
    """
    Register the ONNX symbolic of ``torchvision::deform_conv2d`` (ONNX DeformConv) with
    PyTorch's TorchScript-based ONNX exporter, for `opset_version` (>= 19) and above.
    Torchvision registers symbolics for nms and roi_align only.
    """
    if opset_version < DEFORM_CONV_ONNX_OPSET:
        raise ValueError(
            f"ONNX DeformConv needs opset >= {DEFORM_CONV_ONNX_OPSET}, got {opset_version}."
        )
    torch.onnx.register_custom_op_symbolic(
        "torchvision::deform_conv2d", _deform_conv2d_symbolic, opset_version
    )


def deform_conv_onnx_translation_table() -> dict:
    """
    The same mapping for PyTorch's torch.export-based exporter: pass it as
    ``torch.onnx.export(..., dynamo=True, opset_version=19, custom_translation_table=...)``.
    For graphs torch.export can capture, e.g. the backbone and head without Detectron2's
    post-processing (see the module docstring); needs `onnxscript`.
    """
    from onnxscript import opset19 as op

    def deform_conv2d(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
        groups: int,
        offset_groups: int,
        use_mask: bool,
    ):
        attrs = dict(
            dilations=[dilation_h, dilation_w],
            group=groups,
            offset_group=offset_groups,
            pads=[pad_h, pad_w, pad_h, pad_w],
            strides=[stride_h, stride_w],
        )
        if use_mask:
            return op.DeformConv(input, weight, offset, bias, mask, **attrs)
        return op.DeformConv(input, weight, offset, bias, **attrs)

    return {torch.ops.torchvision.deform_conv2d.default: deform_conv2d}


# ---------------------------------------------------------------------------------------------
# Tracing
# ---------------------------------------------------------------------------------------------


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
    _check_exportable(model)
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


def export_onnx(
    model: nn.Module,
    image: Tensor,
    path: str,
    opset_version: Optional[int] = None,
) -> int:
    """
    Trace `model` on `image` into an ONNX file `path` with dynamic height and width.

    Args:
        opset_version: default :data:`DEFAULT_ONNX_OPSET` (17), or
            :data:`DEFORM_CONV_ONNX_OPSET` (19) when the model has "torchvision" deformable convs,
            which export to ONNX DeformConv.

    Returns:
        the opset used.
    """
    impls = _check_exportable(model)
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


# ---------------------------------------------------------------------------------------------
# Running exported models
# ---------------------------------------------------------------------------------------------


def outputs_to_instances(outputs: Sequence[Union[Tensor, np.ndarray]]) -> Instances:
    """Instances (pred_boxes, scores, pred_classes) from the flat outputs of an exported VFNet."""
    boxes, classes, scores, image_size = (torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x) for x in outputs)
    image_size = tuple(int(s) for s in image_size)
    return Instances(image_size, pred_boxes=Boxes(boxes.float()), scores=scores.float(), pred_classes=classes.long())


class ExportedPredictor:
    """
    Run an exported VFNet (``model.ts`` or ``model.onnx``) like Detectron2's `DefaultPredictor`:
    takes one BGR image (H, W, 3) uint8 array, resizes it as the test does, and returns
    ``{"instances": Instances}`` in the original image's coordinates.

    Args:
        path: a ``.ts`` (TorchScript, run with torch) or ``.onnx`` file (run with onnxruntime).
        min_size_test, max_size_test, input_format: ``cfg.INPUT.{MIN,MAX}_SIZE_TEST`` and
            ``cfg.INPUT.FORMAT`` of the exported model; default: from ``export_info.json`` next to
            `path` (written by :func:`export_model`).
        providers: onnxruntime execution providers (default: CPU).
        device: where a TorchScript model runs: the device it was exported on (default "cpu").
    """

    def __init__(
        self,
        path: str,
        min_size_test: Optional[int] = None,
        max_size_test: Optional[int] = None,
        input_format: Optional[str] = None,
        providers: Optional[List[str]] = None,
        device: str = "cpu",
    ):
        info = {}
        info_path = os.path.join(os.path.dirname(os.path.abspath(path)), "export_info.json")
        if os.path.isfile(info_path):
            with open(info_path) as f:
                info = json.load(f)
        self.min_size_test = min_size_test or info.get("min_size_test", 800)
        self.max_size_test = max_size_test or info.get("max_size_test", 1333)
        self.input_format = input_format or info.get("input_format", "BGR")
        assert self.input_format in ("BGR", "RGB"), self.input_format
        self.path = path
        if path.endswith(".onnx"):
            import onnxruntime as ort

            self.session = ort.InferenceSession(path, providers=providers or ["CPUExecutionProvider"])
            self.ts_model = None
            spec = self.session.get_modelmeta().custom_metadata_map.get(POST_PROCESSING_KEY)
        else:
            import torchvision  # noqa: F401  (its operators, for "torchvision" deformable convs)

            self.session = None
            self.device = torch.device(device)
            extra = {POST_PROCESSING_KEY: ""}
            self.ts_model = torch.jit.load(path, map_location=self.device, _extra_files=extra)
            spec = extra[POST_PROCESSING_KEY] or None
        # The post-processing the graph leaves out (soft-NMS), as stored in the file.
        self.post_processing = json.loads(spec) if spec else None

    def run(self, image: Tensor) -> Instances:
        """The detections of the graph on one (3, H, W) float tensor, in its coordinates."""
        if self.session is not None:
            outputs = self.session.run(list(OUTPUT_NAMES), {"image": image.detach().cpu().numpy()})
        else:
            with torch.no_grad():
                outputs = [x.cpu() for x in self.ts_model(image.to(self.device))]
        return apply_post_processing(outputs_to_instances(outputs), self.post_processing)

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Detectron2's model interface (for `inference_on_dataset`): resized images, height/width."""
        results = []
        for x in batched_inputs:
            inst = self.run(x["image"].float())
            height = x.get("height", inst.image_size[0])
            width = x.get("width", inst.image_size[1])
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        height, width = original_image.shape[:2]
        image = resize_for_test(original_image, self.min_size_test, self.max_size_test, self.input_format)
        return self.inference([{"image": image, "height": height, "width": width}])[0]


def resize_for_test(original_image: np.ndarray, min_size_test: int, max_size_test: int, input_format: str = "BGR") -> Tensor:
    """A BGR (H, W, 3) image as the (3, H', W') float tensor the model sees at test time."""
    import detectron2.data.transforms as T

    if input_format == "RGB":
        original_image = original_image[:, :, ::-1]
    aug = T.ResizeShortestEdge([min_size_test, min_size_test], max_size_test)
    image = aug.get_transform(original_image).apply_image(original_image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))


# ---------------------------------------------------------------------------------------------
# Exporting a config's model (tools/export_model.py)
# ---------------------------------------------------------------------------------------------


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


def export_model(
    cfg,
    output_dir: str,
    fmt: str = "torchscript",
    sample_image_path: Optional[str] = None,
    opset: Optional[int] = None,
    run_eval: bool = False,
):
    """
    Export the model of `cfg` (see :func:`setup_cfg`) with its MODEL.WEIGHTS as `fmt`
    ("torchscript" or "onnx", ONNX opset `opset`, default as :func:`export_onnx`) to
    `output_dir`, traced on `sample_image_path` (default: a random image of the test size), and
    write export_info.json beside it. Then run the exported model on the traced image and log
    how it compares with the eager model; with `run_eval` evaluate it on DATASETS.TEST[0].

    Returns:
        the COCO metrics with `run_eval`, else the contents of export_info.json; None when the
        exported ONNX model cannot be run (onnxruntime is missing).
    """
    PathManager.mkdirs(output_dir)
    model = build_model(cfg)
    DetectionCheckpointer(model).resume_or_load(cfg.MODEL.WEIGHTS, resume=False)
    model.eval()
    image = sample_image(cfg, sample_image_path).to(model.device)

    path = os.path.join(output_dir, FILENAMES[fmt])
    used_opset = None
    if fmt == "torchscript":
        export_torchscript(model, image, path)
    else:
        used_opset = export_onnx(model, image, path, opset)
    info = export_info(cfg, fmt, used_opset, deform_conv_impls(model), post_processing(model))
    with open(os.path.join(output_dir, "export_info.json"), "w") as f:
        json.dump(info, f, indent=2)
    logger.info("Exported %s (%s deformable convs) to %s", fmt, cfg.MODEL.VFNET.DEFORM_CONV_IMPL, path)

    try:
        predictor = ExportedPredictor(path, device=cfg.MODEL.DEVICE)
    except ImportError as e:  # onnxruntime missing
        logger.warning("Cannot check the exported model: %s", e)
        return None
    num_eager, num_exported, err = compare_with_eager(model, predictor, image.cpu())
    msg = f"sample image: eager model {num_eager} detections, exported {num_exported}, max box difference {err:.2e}"
    if num_eager != num_exported or err > 1e-2:
        logger.warning("The exported model differs from the eager one on the %s", msg)
    else:
        logger.info("Checked the exported model on the %s", msg)

    if run_eval:
        return evaluate_exported(cfg, predictor, output_dir)
    return info
