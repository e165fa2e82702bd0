"""
Running an exported VFNet (TorchScript with torch, ONNX with onnxruntime or OpenVINO, OpenVINO's
format with OpenVINO: :mod:`.runtime`) as Detectron2's `DefaultPredictor` runs the eager one.
"""
import json
import os
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from .runtime import open_runtime
from .tracing import apply_post_processing


def outputs_to_instances(outputs: Sequence[Union[Tensor, np.ndarray]]) -> Instances:
    """Instances (pred_boxes, scores, pred_classes) from the flat outputs of an exported VFNet."""
    boxes, classes, scores, image_size = (torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x) for x in outputs)
    image_size = tuple(int(s) for s in image_size)
    return Instances(image_size, pred_boxes=Boxes(boxes.float()), scores=scores.float(), pred_classes=classes.long())


class ExportedPredictor:
    """
    Run an exported VFNet (``model.ts``, ``model.onnx`` or ``model.xml``) like Detectron2's
    `DefaultPredictor`: takes one BGR image (H, W, 3) uint8 array, resizes it as the test does,
    and returns ``{"instances": Instances}`` in the original image's coordinates; :meth:`batch`
    does so for a list of images.

    Args:
        path: a ``.ts`` (TorchScript, run with torch), ``.onnx`` (onnxruntime or OpenVINO) or
            ``.xml`` file (OpenVINO, its ``.bin`` beside it).
        min_size_test, max_size_test, input_format: ``cfg.INPUT.{MIN,MAX}_SIZE_TEST`` and
            ``cfg.INPUT.FORMAT`` of the exported model; default: from ``export_info.json`` next to
            `path` (written by :func:`export_model`).
        providers: onnxruntime execution providers (default: CPU).
        device: where a TorchScript model runs: the device it was exported on (default "cpu").
        runtime, precision, num_threads, num_streams: see :func:`open_runtime`; the runtime
            defaults to torch, onnxruntime and OpenVINO for the three extensions.
    """

    def __init__(
        self,
        path: str,
        min_size_test: Optional[int] = None,
        max_size_test: Optional[int] = None,
        input_format: Optional[str] = None,
        providers: Optional[List[str]] = None,
        device: str = "cpu",
        runtime: Optional[str] = None,
        precision: str = "f32",
        num_threads: Optional[int] = None,
        num_streams: Optional[int] = None,
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
        self.runtime = open_runtime(path, runtime, device, providers, precision, num_threads, num_streams)
        # The post-processing the graph leaves out (soft-NMS), as stored in the file.
        self.post_processing = self.runtime.post_processing

    def run(self, image: Tensor) -> Instances:
        """The detections of the graph on one (3, H, W) float tensor, in its coordinates."""
        return self.run_all([image])[0]

    def run_all(self, images: Sequence[Tensor]) -> List[Instances]:
        """:meth:`run` for each of `images` (OpenVINO runs `num_streams` of them at once)."""
        outputs = self.runtime.run_all(images)
        return [apply_post_processing(outputs_to_instances(out), self.post_processing) for out in outputs]

    def inference(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        """Detectron2's model interface (for `inference_on_dataset`): resized images, height/width."""
        results = []
        for x, inst in zip(batched_inputs, self.run_all([x["image"].float() for x in batched_inputs])):
            height = x.get("height", inst.image_size[0])
            width = x.get("width", inst.image_size[1])
            results.append({"instances": detector_postprocess(inst, height, width)})
        return results

    def __call__(self, original_image: np.ndarray) -> Dict[str, Instances]:
        return self.batch([original_image])[0]

    def batch(self, original_images: Sequence[np.ndarray]) -> List[Dict[str, Instances]]:
        """The detections of each BGR (H, W, 3) image, as :meth:`__call__` returns them."""
        return self.inference([self.test_input(image) for image in original_images])

    def test_input(self, original_image: np.ndarray) -> Dict:
        """A BGR (H, W, 3) image as the model's input: resized "image", original height, width."""
        height, width = original_image.shape[:2]
        image = resize_for_test(original_image, self.min_size_test, self.max_size_test, self.input_format)
        return {"image": image, "height": height, "width": width}


def resize_for_test(original_image: np.ndarray, min_size_test: int, max_size_test: int, input_format: str = "BGR") -> Tensor:
    """A BGR (H, W, 3) image as the (3, H', W') float tensor the model sees at test time."""
    import detectron2.data.transforms as T

    if input_format == "RGB":
        original_image = original_image[:, :, ::-1]
    aug = T.ResizeShortestEdge([min_size_test, min_size_test], max_size_test)
    image = aug.get_transform(original_image).apply_image(original_image)
    return torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
