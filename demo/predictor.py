"""
Run a VFNet on images and video frames and draw its detections with Detectron2's visualizers,
labelled with the class names of the config's test dataset (Detectron2's demo/predictor.py,
for a detector: boxes, scores and classes).
"""
import json
import os
from typing import Iterator, List, Optional, Tuple
import cv2
import numpy as np
import torch

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.engine.defaults import DefaultPredictor
from detectron2.utils.video_visualizer import VideoVisualizer
from detectron2.utils.visualizer import ColorMode, VisImage, Visualizer

from vfnet.checkpoint.detection_checkpoint import VFNetCheckpointer
from vfnet.export import resize_for_test


def dataset_class_names(dataset_name: str) -> Optional[List[str]]:
    """
    The class names of a registered dataset: its metadata's `thing_classes`, or, for a COCO-format
    dataset registered without them (Detectron2's `register_coco_instances` sets them only when
    the dataset is loaded), the names of its JSON's categories in the order of their ids (the
    order `load_coco_json` gives the contiguous class ids), which are then set on the metadata.
    """
    meta = MetadataCatalog.get(dataset_name)
    if meta.get("thing_classes") is None:
        json_file = meta.get("json_file")
        if not json_file or not os.path.isfile(json_file):
            return None
        with open(json_file) as f:
            categories = sorted(json.load(f).get("categories", []), key=lambda c: c["id"])
        if not categories:
            return None
        meta.thing_classes = [c["name"] for c in categories]
    return list(meta.thing_classes)


def test_metadata(cfg) -> Metadata:
    """The metadata of ``cfg.DATASETS.TEST[0]``, with its class names (see above)."""
    name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else "__unused"
    dataset_class_names(name)
    return MetadataCatalog.get(name)


class Predictor(DefaultPredictor):
    """
    Detectron2's DefaultPredictor, whose MODEL.WEIGHTS this project's checkpointer loads: an
    MMDetection checkpoint too (a file, an http(s) address or vfnet://NAME), converted on load.
    """

    def __init__(self, cfg):
        without_weights = cfg.clone()
        without_weights.defrost()
        without_weights.MODEL.WEIGHTS = ""
        super().__init__(without_weights)
        VFNetCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)

    def batch(self, original_images: List[np.ndarray]) -> List[dict]:
        """
        What `__call__` returns for each BGR (H, W, 3) image, from one forward of them all: the
        model pads the images to one size, the largest, so that an image's detections equal those
        it gets alone where all have one size (video frames), and may differ near its border
        otherwise (as in any Detectron2 batch).
        """
        cfg = self.cfg.INPUT
        inputs = []
        for image in original_images:
            x = resize_for_test(image, cfg.MIN_SIZE_TEST, cfg.MAX_SIZE_TEST, self.input_format)
            inputs.append({"image": x.to(self.cfg.MODEL.DEVICE), "height": image.shape[0], "width": image.shape[1]})
        with torch.no_grad():
            return self.model(inputs)


class VisualizationDemo:
    """
    Args:
        cfg: a frozen VFNet config (weights in ``MODEL.WEIGHTS``).
        instance_mode: Detectron2's color mode of the drawings.
    """

    def __init__(self, cfg, instance_mode: ColorMode = ColorMode.IMAGE):
        self.metadata = test_metadata(cfg)
        self.cpu_device = torch.device("cpu")
        self.instance_mode = instance_mode
        self.predictor = Predictor(cfg)

    def run_on_image(self, image: np.ndarray) -> Tuple[dict, VisImage]:
        """
        Args:
            image: (H, W, 3) uint8 BGR image (OpenCV's format).

        Returns:
            the model's predictions ({"instances": Instances} in the image's coordinates) and
            the drawing (RGB).
        """
        predictions = self.predictor(image)
        visualizer = Visualizer(image[:, :, ::-1], self.metadata, instance_mode=self.instance_mode)
        instances = predictions["instances"].to(self.cpu_device)
        return predictions, visualizer.draw_instance_predictions(predictions=instances)

    @staticmethod
    def _frames(video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        while video.isOpened():
            success, frame = video.read()
            if not success:
                break
            yield frame

    def run_on_video(self, video: cv2.VideoCapture) -> Iterator[np.ndarray]:
        """
        Args:
            video: a `cv2.VideoCapture` of a video file or a webcam.

        Yields:
            the BGR drawing of each frame.
        """
        video_visualizer = VideoVisualizer(self.metadata, self.instance_mode)
        for frame in self._frames(video):
            instances = self.predictor(frame)["instances"].to(self.cpu_device)
            rgb = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            vis = video_visualizer.draw_instance_predictions(rgb, instances)
            yield cv2.cvtColor(vis.get_image(), cv2.COLOR_RGB2BGR)
