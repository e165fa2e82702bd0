"""
Running an exported VFNet (TorchScript with torch, ONNX with onnxruntime) as Detectron2's
`DefaultPredictor` runs the eager one.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .tracing import OUTPUT_NAMES, POST_PROCESSING_KEY, apply_post_processing


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
