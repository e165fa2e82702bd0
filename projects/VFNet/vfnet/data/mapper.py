"""
Image reading for any PIL mode, and the dataset mapper of the project's tools that uses it.
"""

import copy
import logging
import numpy as np
import torch
from PIL import Image, ImageOps

from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import BoxMode
from detectron2.utils.file_io import PathManager

from .augmentations import RandomBoxCutOut, build_train_augmentations
from .transforms import with_resize_backend
from .validation import LOAD_TRUNCATED_FLAG, LOAD_TRUNCATED_KEY, truncated_images_loaded

__all__ = ["read_image", "VFNetDatasetMapper"]

logger = logging.getLogger(__name__)

# PIL modes of 16-bit grayscale images ("I": how some Pillow versions open a 16-bit PNG).
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# The truncated files read_image has warned of, in this process (one warning per file).
_WARNED_TRUNCATED = set()


def _read_image(file_name: str, format: str = None) -> np.ndarray:
    with PathManager.open(file_name, "rb") as f:
        image = Image.open(f)
        image.load()  # decode now, in the caller's PIL settings
        image = ImageOps.exif_transpose(image)
        if image.mode in SIXTEEN_BIT_MODES:
            pixels = np.asarray(image, dtype=np.float32) * (255.0 / 65535.0)
            image = Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))
        return utils.convert_PIL_to_numpy(image, format)


def read_image(file_name: str, format: str = None, load_truncated: bool = False) -> np.ndarray:
    """
    Detectron2's `read_image` (EXIF orientation applied, converted to `format`), except that a
    16-bit grayscale image is scaled to 8 bits (x 255 / 65535): PIL's conversion clips it at 255,
    which turns most images white.

    Args:
        load_truncated: a file that PIL refuses (``image file is truncated``) is decoded again,
            as far as its data goes (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``, set only for that
            decode: see :func:`vfnet.data.validation.truncated_images_loaded`; the pixels OpenCV
            gives), with a warning, once per file and process; if it still fails, the first
            error is raised.
    """
    try:
        return _read_image(file_name, format)
    except Exception as e:
        if not load_truncated:
            raise
        try:
            with truncated_images_loaded():
                image = _read_image(file_name, format)
        except Exception:
            raise e from None
        if file_name not in _WARNED_TRUNCATED:
            _WARNED_TRUNCATED.add(file_name)
            logger.warning(
                f"Image '{file_name}' is truncated ({type(e).__name__}: {e}); it is loaded as far "
                f"as its data goes ({LOAD_TRUNCATED_KEY})."
            )
        return image


class VFNetDatasetMapper(DatasetMapper):
    """
    Detectron2's :class:`DatasetMapper` for detection (no semantic segmentation or precomputed
    proposals), reading images with :func:`read_image` and resizing them with
    INPUT.RESIZE_BACKEND; an image that fails to load or map raises an error that names its file
    and image id. With DATASETS.LOAD_TRUNCATED_IMAGES, truncated image files are loaded as far as
    their data goes, with a warning per file (see :func:`read_image`).
    """

    @configurable
    def __init__(self, *args, load_truncated_images: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.load_truncated_images = load_truncated_images

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        augs = ret["augmentations"]
        if is_train:
            augs = build_train_augmentations(cfg, augs)
        ret["augmentations"] = with_resize_backend(augs, cfg.INPUT.RESIZE_BACKEND)
        ret["load_truncated_images"] = bool(cfg.DATASETS.get("LOAD_TRUNCATED_IMAGES", False))
        return ret

    def __call__(self, dataset_dict):
        try:
            return self._map(copy.deepcopy(dataset_dict))
        except Exception as e:
            hint = ""
            if not self.load_truncated_images and "truncated" in str(e):
                hint = (
                    f" ({LOAD_TRUNCATED_FLAG}, config {LOAD_TRUNCATED_KEY} True, loads truncated "
                    "files as far as their data goes)"
                )
            raise RuntimeError(
                f"Cannot load image '{dataset_dict['file_name']}' (image id "
                f"{dataset_dict.get('image_id')}): {type(e).__name__}: {e}{hint}"
            ) from e

    def _map(self, dataset_dict):
        image = read_image(
            dataset_dict["file_name"],
            format=self.image_format,
            load_truncated=self.load_truncated_images,
        )
        utils.check_image_size(dataset_dict, image)
        boxes = None
        if self.is_train and any(isinstance(a, RandomBoxCutOut) for a in self.augmentations.augs):
            # CutOut reads the boxes (XYXY_ABS), carried through the augmentations before it.
            annotations = [a for a in dataset_dict.get("annotations", []) if a.get("iscrowd", 0) == 0]
            boxes = np.asarray(
                [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations],
                dtype=np.float64,
            ).reshape(-1, 4)
        aug_input = T.AugInput(image, boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if not self.is_train:
            dataset_dict.pop("annotations", None)
            return dataset_dict
        if "annotations" in dataset_dict:
            for anno in dataset_dict["annotations"]:
                # Detectron2's transforms write the new coordinates into the box's own array:
                # a box of integers (as a COCO JSON may hold it) would be truncated after a
                # resize, up to a pixel towards the top-left.
                anno["bbox"] = [float(v) for v in anno["bbox"]]
            self._transform_annotations(dataset_dict, transforms, image.shape[:2])
        return dataset_dict
