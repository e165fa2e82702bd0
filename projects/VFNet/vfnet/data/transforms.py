"""
Resizing with OpenCV, as MMDetection does, for models converted from it
(``INPUT.RESIZE_BACKEND: "cv2"``). Detectron2 resizes uint8 images with PIL, whose bilinear
filter smooths when it shrinks; OpenCV's does not, so the same weights see other pixels.
"""
import cv2
import numpy as np

from detectron2.data import transforms as T

from .augmentations import RandomKeepRatioResize

RESIZE_BACKENDS = ("PIL", "cv2")


class CV2ResizeTransform(T.ResizeTransform):
    """Detectron2's ResizeTransform, resizing images with OpenCV's bilinear interpolation."""

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        assert img.shape[:2] == (self.h, self.w)
        out = cv2.resize(img, (self.new_w, self.new_h), interpolation=cv2.INTER_LINEAR)
        return out.reshape(out.shape[:2] + img.shape[2:])  # cv2 drops a channel axis of 1


class _CV2Resize:
    """Mixin for a resize augmentation: the same sizes, resized with :class:`CV2ResizeTransform`."""

    def get_transform(self, image):
        t = super().get_transform(image)
        if isinstance(t, T.ResizeTransform):
            return CV2ResizeTransform(t.h, t.w, t.new_h, t.new_w, t.interp)
        return t


class CV2ResizeShortestEdge(_CV2Resize, T.ResizeShortestEdge):
    """Detectron2's ResizeShortestEdge (same sizes), resizing with :class:`CV2ResizeTransform`."""


class CV2RandomKeepRatioResize(_CV2Resize, RandomKeepRatioResize):
    """:class:`RandomKeepRatioResize` (same sizes), resizing with :class:`CV2ResizeTransform`."""


_CV2_VARIANTS = {
    T.ResizeShortestEdge: CV2ResizeShortestEdge,
    RandomKeepRatioResize: CV2RandomKeepRatioResize,
}


def with_resize_backend(augmentations, backend: str):
    """
    The augmentations with each ResizeShortestEdge and RandomKeepRatioResize resizing with
    `backend` ("PIL", Detectron2's default, or "cv2").
    """
    if backend not in RESIZE_BACKENDS:
        raise ValueError(f"INPUT.RESIZE_BACKEND must be one of {RESIZE_BACKENDS}, got '{backend}'.")
    if backend == "PIL":
        return augmentations
    out = []
    for aug in augmentations:
        if type(aug) in _CV2_VARIANTS:
            cv2_aug = _CV2_VARIANTS[type(aug)].__new__(_CV2_VARIANTS[type(aug)])
            cv2_aug.__dict__.update(aug.__dict__)  # same sizes and sampling
            aug = cv2_aug
        out.append(aug)
    return out
