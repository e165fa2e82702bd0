"""
Image reading for any PIL mode, and the dataset mapper of the project's tools that uses it.
"""

import copy
import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager

from .transforms import with_resize_backend

__all__ = ["read_image", "VFNetDatasetMapper"]

# PIL modes of 16-bit grayscale images ("I": how some Pillow versions open a 16-bit PNG).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def read_image(file_name: str, format: str = None) -> np.ndarray:
    """
    Detectron2's `read_image` (EXIF orientation applied, converted to `format`), except that a
    16-bit grayscale image is scaled to 8 bits (x 255 / 65535): PIL's conversion clips it at 255,
    which turns most images white.
    """
    with PathManager.open(file_name, "rb") as f:
        image = ImageOps.exif_transpose(Image.open(f))
        if image.mode in SIXTEEN_BIT_MODES:
            pixels = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
            image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
        return utils.convert_PIL_to_numpy(image, format)


class VFNetDatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`DatasetMapper` for detection (no semantic segmentation or precomputed
    proposals), reading images with :func:`read_image` and resizing them with
    INPUT.RESIZE_BACKEND; an image that fails to load or map raises an error that names its file
    and image id.
    """

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        ret["augmentations"] = with_resize_backend(ret["augmentations"], cfg.INPUT.RESIZE_BACKEND)
        return ret

    def __call__(self, dataset_dict):
        try:
            return self._map(copy.deepcopy(dataset_dict))
        except Exception as e:
            raise RuntimeError(
                f"Cannot load image '{dataset_dict['file_name']}' (image id "
                f"{dataset_dict.get('image_id')}): {type(e).__name__}: {e}"
            ) from e

    def _map(self, dataset_dict):
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
