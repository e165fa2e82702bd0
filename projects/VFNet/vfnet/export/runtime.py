"""
The runtimes an exported VFNet runs in: torch for TorchScript (``model.ts``), onnxruntime or
OpenVINO for ONNX (``model.onnx``), OpenVINO for its own format (``model.xml`` + ``model.bin``,
converted from the ONNX graph by :func:`save_openvino`). :func:`open_runtime` opens a file in
one of them and returns a `Runtime`: the graph's four outputs for one image (or a list of
images), and the post-processing the graph leaves out (soft-NMS) as stored in the file.

OpenVINO, two things that change its detections:

* Precision. Its CPU plugin runs an f32 graph in bf16 by default wherever the CPU has bf16
  (Xeons with AMX, EPYCs with AVX512-BF16): scores then move by about 1e-2 and boxes by pixels.
  The runtime asks for ``INFERENCE_PRECISION_HINT`` "f32" unless told "bf16".
* ONNX ``DeformConv`` (opset 19). OpenVINO's ONNX frontend has no conversion rule for the
  standard operator (it converts only its own ``org.openvinotoolkit.DeformableConv2D``), so
  reading such a graph fails ("No conversion rule found for operations: DeformConv-19", then
  "The input data tensor's rank has to be known" at the next Conv). :func:`openvino_core` adds
  one that maps it onto OpenVINO's ``DeformableConvolution`` (opset 8), with torchvision's
  bilinear sampling at the border (``bilinear_interpolation_pad``), as OpenVINO's PyTorch frontend
  maps ``torchvision::deform_conv2d``.
"""
import functools
import json
import os
from typing import List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .tracing import INPUT_NAMES, OUTPUT_NAMES, POST_PROCESSING_KEY

RUNTIMES = ("torchscript", "onnxruntime", "openvino")
# The runtime of a file by its extension, and the runtimes that can open it.
DEFAULT_RUNTIME = {".ts": "torchscript", ".onnx": "onnxruntime", ".xml": "openvino"}
RUNTIMES_OF = {".ts": ("torchscript",), ".onnx": ("onnxruntime", "openvino"), ".xml": ("openvino",)}
# OpenVINO's INFERENCE_PRECISION_HINT on the CPU.
OPENVINO_PRECISIONS = ("f32", "bf16")
PIP_INSTALL = {"onnxruntime": "pip install onnxruntime", "openvino": "pip install openvino"}

Outputs = List[Union[Tensor, np.ndarray]]


def _missing(package: str, path: str) -> ImportError:
    return ImportError(
        f"Running {path} with {package} needs the '{package}' package: {PIP_INSTALL[package]} "
        "(or install this project with its 'deploy' extra)."
    )


class Runtime:
    """
    An exported graph opened in a runtime. Calling it with one (3, H, W) float image returns the
    graph's outputs (boxes, classes, scores, image_size); :meth:`run_all` does so for a list.

    Attributes:
        name: one of :data:`RUNTIMES`.
        post_processing: what the graph leaves out (soft-NMS), as stored in the file
            (:func:`vfnet.export.post_processing`), or None.
    """

    name = ""
    post_processing = None

    def __call__(self, image: Tensor) -> Outputs:
        raise NotImplementedError

    def run_all(self, images: Sequence[Tensor]) -> List[Outputs]:
        """The outputs of each image: the graph takes one image, so one run each."""
        return [self(image) for image in images]


class TorchScriptRuntime(Runtime):
    name = "torchscript"

    def __init__(self, path: str, device: str = "cpu"):
        import torchvision  # noqa: F401  (its operators, for "torchvision" deformable convs)

        self.device = torch.device(device)
        extra = {POST_PROCESSING_KEY: ""}
        self.model = torch.jit.load(path, map_location=self.device, _extra_files=extra)
        self.post_processing = _spec(extra[POST_PROCESSING_KEY])

    def __call__(self, image: Tensor) -> Outputs:
        with torch.no_grad():
            return [x.cpu() for x in self.model(image.to(self.device))]


class OnnxRuntime(Runtime):
    name = "onnxruntime"

    def __init__(self, path: str, providers: Optional[List[str]] = None, num_threads: Optional[int] = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise _missing("onnxruntime", path) from None
        options = ort.SessionOptions()
        if num_threads:
            options.intra_op_num_threads = num_threads
        self.session = ort.InferenceSession(path, options, providers=providers or ["CPUExecutionProvider"])
        self.post_processing = _spec(self.session.get_modelmeta().custom_metadata_map.get(POST_PROCESSING_KEY))

    def __call__(self, image: Tensor) -> Outputs:
        return self.session.run(list(OUTPUT_NAMES), {INPUT_NAMES[0]: _array(image)})


class OpenVINORuntime(Runtime):
    """
    OpenVINO on the CPU. `num_streams` images run at once in :meth:`run_all` (OpenVINO's CPU
    streams, its way of batching on a CPU: each stream runs one image on its share of the
    threads); default 1, every thread on one image.
    """

    name = "openvino"

    def __init__(
        self,
        path: str,
        precision: str = "f32",
        num_threads: Optional[int] = None,
        num_streams: Optional[int] = None,
    ):
        if precision not in OPENVINO_PRECISIONS:
            raise ValueError(f"Unknown OpenVINO precision '{precision}': use one of {OPENVINO_PRECISIONS}.")
        model = read_openvino_model(path)
        config = {"INFERENCE_PRECISION_HINT": precision, "NUM_STREAMS": num_streams or 1}
        if num_threads:
            config["INFERENCE_NUM_THREADS"] = num_threads
        self.compiled = openvino_core().compile_model(model, "CPU", config)
        self.outputs = [self.compiled.output(name) for name in OUTPUT_NAMES]
        self.request = self.compiled.create_infer_request()
        self.post_processing = _spec(openvino_post_processing(model))

    def __call__(self, image: Tensor) -> Outputs:
        result = self.request.infer({INPUT_NAMES[0]: _array(image)})
        return [result[o] for o in self.outputs]

    def run_all(self, images: Sequence[Tensor]) -> List[Outputs]:
        if len(images) < 2:
            return super().run_all(images)
        from openvino import AsyncInferQueue

        outputs = [None] * len(images)

        def done(request, i):
            outputs[i] = [request.get_tensor(o).data.copy() for o in self.outputs]

        queue = AsyncInferQueue(self.compiled, self.compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        queue.set_callback(done)
        for i, image in enumerate(images):
            queue.start_async({INPUT_NAMES[0]: _array(image)}, userdata=i)
        queue.wait_all()
        return outputs


def _spec(text: Optional[str]) -> Optional[dict]:
    return json.loads(text) if text else None


def _array(image: Tensor) -> np.ndarray:
    return np.ascontiguousarray(image.detach().cpu().numpy(), dtype=np.float32)


def open_runtime(
    path: str,
    runtime: Optional[str] = None,
    device: str = "cpu",
    providers: Optional[List[str]] = None,
    precision: str = "f32",
    num_threads: Optional[int] = None,
    num_streams: Optional[int] = None,
) -> Runtime:
    """
    Open the exported model `path` in `runtime` (default: by its extension,
    :data:`DEFAULT_RUNTIME`).

    Args:
        device: where a TorchScript model runs: the device it was exported on.
        providers: onnxruntime's execution providers (default: CPU).
        precision: OpenVINO's inference precision on the CPU, "f32" or "bf16".
        num_threads: threads of onnxruntime or OpenVINO (default: theirs, all cores).
        num_streams: images OpenVINO runs at once in `Runtime.run_all` (default 1).
    """
    ext = os.path.splitext(path)[1].lower()
    if ext not in RUNTIMES_OF:
        raise ValueError(f"Cannot run {path}: expected a file ending in {sorted(RUNTIMES_OF)}.")
    runtime = runtime or DEFAULT_RUNTIME[ext]
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime '{runtime}': use one of {RUNTIMES}.")
    if runtime not in RUNTIMES_OF[ext]:
        raise ValueError(f"The runtime '{runtime}' cannot run {path}: a {ext} file runs with {RUNTIMES_OF[ext]}.")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No exported model at {path}.")
    if runtime == "torchscript":
        return TorchScriptRuntime(path, device)
    if runtime == "onnxruntime":
        return OnnxRuntime(path, providers, num_threads)
    return OpenVINORuntime(path, precision, num_threads, num_streams)


# ----------------------------------------------------------------------------------------------
# OpenVINO: reading ONNX (DeformConv included) and its own format


def _deform_conv(node):
    """ONNX DeformConv (inputs X, W, offset, B, mask) as OpenVINO's DeformableConvolution-8."""
    import openvino.opset8 as ops

    x, weight, offset = (node.get_input(i) for i in range(3))
    mask = node.get_input(4) if node.get_input_size() > 4 else None
    pads = node.get_attribute("pads")
    out = ops.deformable_convolution(
        x, offset, weight, node.get_attribute("strides"), pads[:2], pads[2:],
        node.get_attribute("dilations"), mask, "explicit", node.get_attribute("group"),
        node.get_attribute("offset_group"), bilinear_interpolation_pad=True,
    )  # fmt: skip
    if node.get_input_size() > 3:
        bias = ops.reshape(node.get_input(3), ops.constant(np.array([1, -1, 1, 1], dtype=np.int64)), False)
        out = ops.add(out, bias)
    return out.outputs()


def openvino_core():
    """
    The process's OpenVINO `Core`, which reads ONNX DeformConv (see the module docstring).

    One for the process, not one per model: OpenVINO's CPU plugin (2026.4) installs an alternate
    signal stack on the thread that compiles a model and, when its Core goes, puts back the one
    it found. Two Cores that go in another order than they came leave the thread's alternate
    stack on freed memory, and the next signal handled there (Python's handlers run there, e.g.
    torch's SIGCHLD handler when a child process ends) kills the process with SIGSEGV, before
    faulthandler can say anything.
    """
    try:
        import openvino  # noqa: F401
    except ImportError:
        raise _missing("openvino", "an exported model") from None
    return _process_core()


@functools.lru_cache(maxsize=None)
def _process_core():
    import openvino as ov
    from openvino.frontend.onnx import ConversionExtension

    core = ov.Core()
    core.add_extension(ConversionExtension("DeformConv", _deform_conv))
    return core


def read_openvino_model(path: str):
    """The OpenVINO model of an ONNX file or of an OpenVINO IR (``.xml`` with its ``.bin``)."""
    if path.lower().endswith(".xml"):
        weights = os.path.splitext(path)[0] + ".bin"
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"The OpenVINO model {path} needs its weights {weights} beside it.")
    return openvino_core().read_model(path)


def openvino_post_processing(model) -> Optional[str]:
    """The post-processing stored in an OpenVINO model: the ONNX metadata it was read from."""
    key = ["framework", POST_PROCESSING_KEY]
    return model.get_rt_info(key).astype(str) if model.has_rt_info(key) else None


def save_openvino(onnx_path: str, xml_path: str) -> None:
    """
    Convert the ONNX graph `onnx_path` into OpenVINO's format: `xml_path` and the .bin beside it,
    with the weights in float32 (OpenVINO compresses them to float16 by default).
    """
    import openvino as ov

    ov.save_model(read_openvino_model(onnx_path), xml_path, compress_to_fp16=False)
