"""INPUT.RESIZE_BACKEND: Detectron2's PIL resize or MMDetection's OpenCV resize."""
import numpy as np
import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

import cv2  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402

import vfnet  # noqa: E402
from vfnet.data.mapper import VFNetDatasetMapper  # noqa: E402
from vfnet.data.transforms import CV2ResizeShortestEdge, with_resize_backend  # noqa: E402


def mapper_resize(backend, is_train):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.INPUT.RESIZE_BACKEND = backend
    mapper = VFNetDatasetMapper(cfg, is_train=is_train)
    return [a for a in mapper.augmentations.augs if isinstance(a, T.ResizeShortestEdge)][0]


@pytest.mark.parametrize("is_train", [True, False])
def test_the_mapper_resizes_with_the_configured_backend(is_train):
    assert type(mapper_resize("PIL", is_train)) is T.ResizeShortestEdge
    cv2_resize = mapper_resize("cv2", is_train)
    assert type(cv2_resize) is CV2ResizeShortestEdge
    # Same sizes and sampling as Detectron2's.
    assert vars(cv2_resize) == vars(mapper_resize("PIL", is_train))


def test_cv2_backend_resizes_like_opencv_and_to_the_same_size_as_pil():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    pil_aug = T.ResizeShortestEdge(100, 1333)
    (cv2_aug,) = with_resize_backend([pil_aug], "cv2")
    pil_out = pil_aug.get_transform(image).apply_image(image)
    cv2_out = cv2_aug.get_transform(image).apply_image(image)
    assert pil_out.shape == cv2_out.shape == (100, 167, 3)
    np.testing.assert_array_equal(cv2_out, cv2.resize(image, (167, 100), interpolation=cv2.INTER_LINEAR))
    # Shrinking 3x: PIL's filter smooths over the whole footprint, OpenCV's bilinear does not.
    assert np.abs(pil_out.astype(int) - cv2_out.astype(int)).max() > 20
    gray = image[:, :, :1]
    assert cv2_aug.get_transform(gray).apply_image(gray).shape == (100, 167, 1)


def test_unknown_backend_is_refused_by_name():
    with pytest.raises(ValueError, match="'skimage'"):
        with_resize_backend([], "skimage")
