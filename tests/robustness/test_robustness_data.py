"""
Bad and unusual data: image modes, broken image files, broken or degenerate COCO annotations.
Each case either works or stops at registration with one message naming the file and entry.
"""

import glob
import json
import logging
import os
import re
import numpy as np
import pytest
from PIL import Image

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import (  # noqa: E402
    DatasetCatalog,
    MetadataCatalog,
    build_detection_train_loader,
)
from detectron2.structures import BoxMode  # noqa: E402

import vfnet  # noqa: E402
from vfnet.data.detection_utils import get_training_dataset_dicts  # noqa: E402
from vfnet.data.mapper import VFNetDatasetMapper, read_image  # noqa: E402
from vfnet.data.validation import DatasetError, check_image_file  # noqa: E402

from helpers import RACCOON  # noqa: E402


def rgb_pattern(height=24, width=40):
    """(H, W, 3) uint8 image whose rows, columns and channels all differ."""
    ys, xs = np.mgrid[0:height, 0:width]
    return np.stack([xs * 6, ys * 10, (xs + ys) * 3], axis=-1).astype(np.uint8)


def save_exif_rotated(path, pixels, orientation):
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(path, exif=exif, quality=95)


def _gray16(path):
    values = (np.arange(24 * 40).reshape(24, 40) * 68).astype(np.uint16)
    Image.fromarray(values).save(path)
    gray = np.round(values / 257.0).astype(np.uint8)
    return np.repeat(gray[..., None], 3, axis=-1)


def _rgb48(path):
    import cv2

    rgb = rgb_pattern().astype(np.uint16) * 257
    cv2.imwrite(path, rgb[..., ::-1])
    return rgb_pattern()


def _simple(mode, **save):
    def write(path):
        Image.fromarray(rgb_pattern()).convert(mode).save(path, **save)
        return np.asarray(Image.open(path).convert("RGB"))

    return write


def _exif(path):
    # Stored 24 x 40; orientation 6: shown turned 90 degrees clockwise, 40 x 24.
    save_exif_rotated(path, rgb_pattern(), 6)
    return np.rot90(np.asarray(Image.open(path).convert("RGB")), k=-1)


# file name -> a function that writes the file and returns the RGB pixels read_image must give
IMAGE_KINDS = {
    "gray.jpg": _simple("L", quality=95),
    "rgba.png": _simple("RGBA"),
    "cmyk.jpg": _simple("CMYK", quality=95),
    "palette.png": _simple("P"),
    "gray16.png": _gray16,
    "rgb48.png": _rgb48,
    "exif_rotated.jpg": _exif,
}


@pytest.mark.parametrize("kind", sorted(IMAGE_KINDS))
def test_read_image_gives_the_pixels_in_bgr(kind, tmp_path):
    path = str(tmp_path / kind)
    expected = IMAGE_KINDS[kind](path)
    image = read_image(path, format="BGR")
    assert image.dtype == np.uint8 and image.shape == expected.shape
    diff = np.abs(image[..., ::-1].astype(int) - expected.astype(int))
    assert diff.max() <= 1, kind


def test_detectron2_read_image_saturates_16_bit_gray_which_ours_does_not(tmp_path):
    from detectron2.data.detection_utils import read_image as d2_read_image

    path = str(tmp_path / "gray16.png")
    _gray16(path)
    assert (d2_read_image(path, format="BGR") == 255).mean() > 0.9
    assert (read_image(path, format="BGR") == 255).mean() < 0.01


# --- COCO JSON helpers ------------------------------------------------------------------------


def write_images(root, sizes, prefix=""):
    """PNG images {prefix}1.png, {prefix}2.png, ... of the given (height, width)."""
    images = []
    for i, (h, w) in enumerate(sizes, start=1):
        Image.fromarray(rgb_pattern(h, w)).save(root / f"{prefix}{i}.png")
        images.append({"id": i, "file_name": f"{prefix}{i}.png", "height": h, "width": w})
    return images


def write_json(path, coco):
    path.write_text(json.dumps(coco))
    return str(path)


def ann(id, image_id, bbox, category_id=1, **extra):
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


CATEGORIES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]


@pytest.fixture
def vfnet_log(caplog):
    """pytest's caplog, also for the "vfnet" logger when its records do not reach the root."""
    logger = logging.getLogger("vfnet")
    logger.addHandler(caplog.handler)
    yield caplog
    logger.removeHandler(caplog.handler)


@pytest.fixture
def register(tmp_path, request):
    """register(coco_or_json_path, **kw) -> dataset name; unregistered after the test."""
    names = []

    def register(coco, **kwargs):
        name = f"robustness_{request.node.name}_{len(names)}"
        json_file = coco if isinstance(coco, str) else write_json(tmp_path / f"{name}.json", coco)
        names.append(name)
        return vfnet.register_coco_dataset(f"{name}={json_file}:{tmp_path}", **kwargs)

    yield register
    for name in names:
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)


def test_invalid_boxes_are_clipped_or_dropped_with_a_warning(tmp_path, register, vfnet_log):
    images = write_images(tmp_path, [(40, 60), (30, 30)])
    annotations = [
        ann(1, 1, [10, 5, 20, 10], area=200.0, iscrowd=0),  # kept as is
        ann(2, 1, [-5, 30, 20, 20], area=400.0, iscrowd=0),  # partly outside: clipped
        ann(3, 1, [70, 50, 5, 5], iscrowd=0),  # wholly outside: dropped
        ann(4, 1, [10, 10, 0, 5]),  # zero width: dropped
        ann(5, 2, [10, 10, 5, -2]),  # negative height: dropped
        ann(6, 2, [float("nan"), 1, 2, 3]),  # NaN: dropped
        ann(7, 2, [1, 1, float("inf"), 3]),  # inf: dropped
        ann(8, 2, [1, None, 2, 3]),  # null: dropped
        ann(9, 5, [1, 1, 2, 3]),  # image id 5 is not in "images": dropped (with the option)
        ann(10, 2, [0, 0, 30, 30], category_id=3),  # whole image, no area/iscrowd: filled
    ]
    coco = {"images": images, "annotations": annotations, "categories": CATEGORIES}
    with vfnet_log.at_level(logging.INFO, logger="vfnet"):
        name = register(coco, drop_unreadable_images=True)
    log = vfnet_log.text
    assert "bbox partly outside its image: 1 of 10 annotations (ids 2)" in log
    assert "bbox wholly outside its image: 1 of 10 annotations (ids 3)" in log
    assert "zero or negative width or height: 2 of 10 annotations (ids 4, 5)" in log
    assert "NaN, inf or null coordinates: 3 of 10 annotations (ids 6, 7, 8)" in log
    assert "image id not in 'images' (DATASETS.DROP_UNREADABLE_IMAGES): 1 of 10 annotations (ids 9)" in log
    assert "missing 'iscrowd' set to 0: 1 of 10 annotations (ids 10)" in log

    dicts = {d["image_id"]: d for d in DatasetCatalog.get(name)}
    boxes = {i: [a["bbox"] for a in d["annotations"]] for i, d in dicts.items()}
    assert boxes == {1: [[10, 5, 20, 10], [0.0, 30.0, 15.0, 10.0]], 2: [[0, 0, 30, 30]]}
    assert [a["category_id"] for a in dicts[2]["annotations"]] == [1]  # contiguous id of 3
    # The evaluator reads the same, cleaned, annotations.
    meta = MetadataCatalog.get(name)
    with open(meta.json_file) as f:
        cleaned = json.load(f)["annotations"]
    assert [a["id"] for a in cleaned] == [1, 2, 10]
    assert cleaned[1]["area"] == 150.0 and cleaned[2]["area"] == 900 and cleaned[2]["iscrowd"] == 0
    assert meta.thing_classes == ["a", "b"]


def test_a_clean_dataset_is_read_from_its_own_json(tmp_path, register, vfnet_log):
    images = write_images(tmp_path, [(40, 60)])
    coco = {
        "images": images,
        "annotations": [ann(1, 1, [1, 2, 3, 4], area=12, iscrowd=0)],
        "categories": CATEGORIES,
    }
    with vfnet_log.at_level(logging.WARNING, logger="vfnet"):
        name = register(coco)
    assert vfnet_log.text == ""
    assert MetadataCatalog.get(name).json_file == str(tmp_path / f"{name}.json")


def test_category_id_not_in_categories_is_refused(tmp_path, register):
    images = write_images(tmp_path, [(40, 60)])
    coco = {
        "images": images,
        "annotations": [ann(1, 1, [1, 1, 5, 5]), ann(2, 1, [1, 1, 5, 5], 7)],
        "categories": CATEGORIES,
    }
    with pytest.raises(
        DatasetError,
        match=r"1 annotations have a category_id that is not in "
        r"'categories' \(\[1, 3\]\): annotation id 2 of image id 1: category_id 7",
    ):
        register(coco)


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_duplicate_ids_are_refused(tmp_path, register, key):
    images = write_images(tmp_path, [(40, 60), (40, 60)])
    coco = {
        "images": images,
        "annotations": [ann(1, 1, [1, 1, 5, 5]), ann(2, 2, [1, 1, 5, 5])],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    coco[key][1]["id"] = coco[key][0]["id"]
    with pytest.raises(DatasetError, match=rf"{key} ids 1 appear more than once"):
        register(coco)


NOT_COCO = {
    "not_json": ("images: []", r"is not a JSON file"),
    "a_list": ([], r"is not a COCO instances file: it holds a JSON list"),
    "no_images": ({"annotations": [], "categories": []}, r"it has no 'images' list"),
    "annotation_without_bbox": (
        {
            "images": [],
            "categories": [],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1}],
        },
        r"annotations\[0\] has no \['bbox'\]",
    ),
    "bbox_of_3_numbers": (
        {"images": [], "categories": [], "annotations": [ann(4, 1, [1, 2, 3])]},
        r"annotations\[0\] \(id 4, image id 1\) has bbox \[1, 2, 3\]; it must be",
    ),
    "zero_width_image": (
        {"images": [{"id": 1, "file_name": "1.png", "height": 40, "width": 0}], "categories": []},
        r"images\[0\] \(id 1\) has width 0 and height 40",
    ),
    "no_categories": ({"images": [], "annotations": [], "categories": []}, r"has no categories"),
    "file_name_not_a_path": (
        {"images": [{"id": 1, "file_name": 7, "height": 40, "width": 9}], "categories": []},
        r"images\[0\] \(id 1\) has file_name 7; it must be the image's path",
    ),
    "area_not_a_number": (
        {"images": [], "categories": [], "annotations": [ann(4, 1, [1, 2, 3, 4], area="12")]},
        r"annotations\[0\] \(id 4, image id 1\) has area '12'; it must be a number",
    ),
    "iscrowd_not_0_or_1": (
        {"images": [], "categories": [], "annotations": [ann(4, 1, [1, 2, 3, 4], iscrowd=2)]},
        r"annotations\[0\] \(id 4, image id 1\) has iscrowd 2; it must be 0 or 1",
    ),
}


@pytest.mark.parametrize("case", sorted(NOT_COCO))
def test_a_json_that_is_not_coco_is_refused_with_the_file_and_key(tmp_path, register, case):
    content, message = NOT_COCO[case]
    path = tmp_path / "bad.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(DatasetError, match=message) as info:
        register(str(path))
    assert str(path) in str(info.value)


def test_an_empty_annotation_list_registers_but_does_not_train(tmp_path, register, vfnet_log):
    images = write_images(tmp_path, [(40, 60)])
    with vfnet_log.at_level(logging.WARNING, logger="vfnet"):
        name = register({"images": images, "annotations": [], "categories": CATEGORIES})
    assert "has no annotations: it cannot be trained on" in vfnet_log.text
    assert DatasetCatalog.get(name)[0]["annotations"] == []
    cfg = get_cfg()
    cfg.DATASETS.TRAIN = (name,)
    with pytest.raises(AssertionError, match=f"No valid data found in {name}"):
        build_detection_train_loader(cfg)


# --- image files ------------------------------------------------------------------------------


def _truncate(path, keep=0.5):
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


def _make_file(tmp_path, case):
    """Write the image file of a case; returns its (file_name, JSON width, JSON height)."""
    if case == "missing":
        return "missing.png", 40, 24
    if case == "truncated_jpeg":
        Image.fromarray(rgb_pattern(48, 64)).save(tmp_path / "t.jpg", quality=95)
        _truncate(tmp_path / "t.jpg")
        return "t.jpg", 64, 48
    if case == "truncated_png":
        Image.fromarray(rgb_pattern(48, 64)).save(tmp_path / "t.png")
        _truncate(tmp_path / "t.png", keep=0.8)
        return "t.png", 64, 48
    if case == "not_an_image":
        (tmp_path / "text.jpg").write_text("not an image")
        return "text.jpg", 40, 24
    if case == "size_mismatch":
        Image.fromarray(rgb_pattern(24, 40)).save(tmp_path / "s.png")
        return "s.png", 41, 24
    if case == "exif_unrotated_size":
        save_exif_rotated(tmp_path / "e.jpg", rgb_pattern(24, 40), 6)
        return "e.jpg", 40, 24  # the JSON gives the stored size, not the shown one
    raise ValueError(case)


BROKEN_FILES = {
    "missing": r"does not exist",
    "truncated_jpeg": r"is not a readable image \(OSError: image file is truncated",
    "truncated_png": r"is not a readable image",
    "not_an_image": r"is not a readable image \(UnidentifiedImageError",
    "size_mismatch": r"is 40x24 \(width x height\), but the JSON says 41x24",
    "exif_unrotated_size": (
        r"is 24x40 \(width x height\) after its EXIF orientation 6, but the JSON says 40x24"
    ),
}


@pytest.mark.parametrize("case", sorted(BROKEN_FILES))
def test_a_broken_image_file_is_refused_at_registration(tmp_path, register, case):
    file_name, width, height = _make_file(tmp_path, case)
    images = [{"id": 7, "file_name": file_name, "height": height, "width": width}]
    coco = {"images": images, "annotations": [ann(1, 7, [1, 1, 5, 5])], "categories": CATEGORIES}
    with pytest.raises(
        DatasetError, match=r"Dataset 'robustness_\S+': 1 of 1 image files cannot be used"
    ) as info:
        register(coco)
    message = str(info.value)
    assert f"'{tmp_path / file_name}' (image id 7) " in message
    assert re.search(BROKEN_FILES[case], message), message
    register(coco, check_files=False)  # the files are only checked on request


def test_images_that_read_fine_pass_the_file_check(tmp_path):
    for kind, write in IMAGE_KINDS.items():
        height, width = write(str(tmp_path / kind)).shape[:2]
        assert check_image_file(str(tmp_path / kind), width, height) is None, kind
    # Bytes after a JPEG's end marker (some cameras append data) are no error.
    with open(tmp_path / "gray.jpg", "ab") as f:
        f.write(b"trailing data" * 100)
    assert check_image_file(str(tmp_path / "gray.jpg"), 40, 24) is None


def vfnet_cfg():
    import vfnet

    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    return cfg


def test_mapper_error_names_the_file_and_image_id(tmp_path):
    Image.fromarray(rgb_pattern(24, 40)).save(tmp_path / "x.png")
    mapper = VFNetDatasetMapper(vfnet_cfg(), is_train=False)
    record = {"file_name": str(tmp_path / "x.png"), "image_id": 12, "height": 24, "width": 41}
    with pytest.raises(
        RuntimeError,
        match=rf"Cannot load image '{tmp_path / 'x.png'}' \(image id 12\): SizeMismatchError",
    ):
        mapper(record)


@pytest.mark.skipif(not os.path.isdir(RACCOON), reason=f"the raccoon dataset is not in {RACCOON}")
def test_raccoon_grayscale_images_map_to_three_equal_channels():
    paths = sorted(glob.glob(os.path.join(RACCOON, "images", "*.jpg")))
    gray = [p for p in paths if Image.open(p).mode == "L"]
    assert len(gray) == 3
    mapper = VFNetDatasetMapper(vfnet_cfg(), is_train=True)
    for path in gray:
        width, height = Image.open(path).size
        box = {"bbox": [1, 1, 20, 20], "bbox_mode": BoxMode.XYWH_ABS, "category_id": 0}
        out = mapper(
            {
                "file_name": path,
                "image_id": 1,
                "height": height,
                "width": width,
                "annotations": [box],
            }
        )
        image = out["image"]
        assert image.shape[0] == 3 and (image[0] == image[1]).all() and (image[1] == image[2]).all()
        assert len(out["instances"]) == 1


# --- a training set that its filters leave empty ----------------------------------------------


def boxed(images, boxes_of):
    """COCO annotations: `boxes_of[image id]` the [x, y, w, h] boxes of that image."""
    boxes = [(i, box) for i in sorted(boxes_of) for box in boxes_of[i]]
    return [ann(n, i, box, area=box[2] * box[3], iscrowd=0) for n, (i, box) in enumerate(boxes, 1)]


def test_a_training_set_without_annotations_is_refused_naming_the_dataset_counts_and_key(
    tmp_path, register
):
    images = write_images(tmp_path, [(40, 50)] * 3)
    name = register({"images": images, "annotations": [], "categories": CATEGORIES})
    with pytest.raises(DatasetError) as e:
        get_training_dataset_dicts([name], "detectron2", filter_empty=True)
    message = str(e.value)
    assert f"dataset '{name}' has 3 images" in message
    assert "DATALOADER.FILTER_EMPTY_ANNOTATIONS True removed its 3 without a (non-crowd) annotation" in message
    assert "DATALOADER.FILTER_EMPTY_ANNOTATIONS False keeps the images without annotations" in message
    # The key it names keeps them.
    assert len(get_training_dataset_dicts([name], "detectron2", filter_empty=False)) == 3


def test_the_mmdet_filter_leaving_nothing_names_both_of_its_filters(tmp_path, register):
    # Images 1-2 without annotations; 3-4 annotated but under 32 px on a side.
    images = write_images(tmp_path, [(40, 50), (40, 50), (20, 50), (40, 30)])
    annotations = boxed(images, {3: [[1, 1, 5, 5]], 4: [[2, 2, 8, 8]]})
    name = register({"images": images, "annotations": annotations, "categories": CATEGORIES})
    with pytest.raises(DatasetError) as e:
        get_training_dataset_dicts(name, "mmdet", min_size=32)
    message = str(e.value)
    assert f"dataset '{name}' has 4 images" in message
    assert "'mmdet' removed 2 without annotations and 2 smaller than 32 px on a side (DATALOADER.MIN_IMAGE_SIZE)" in message
    assert "DATALOADER.TRAIN_FILTER detectron2 with DATALOADER.FILTER_EMPTY_ANNOTATIONS False" in message
    assert len(get_training_dataset_dicts(name, "mmdet", min_size=16)) == 2
    # The LazyConfig's function of the mmdet filter refuses it alike.
    with pytest.raises(DatasetError, match="No training image is left"):
        vfnet.data.detection_utils.get_detection_dataset_dicts_as_mmdet(name, min_size=32)


def test_two_datasets_are_counted_each(tmp_path, register):
    a = register({"images": write_images(tmp_path, [(40, 50)] * 2, "a"), "categories": CATEGORIES, "annotations": []})
    b = register({"images": write_images(tmp_path, [(40, 50)] * 5, "b"), "categories": CATEGORIES, "annotations": []})
    with pytest.raises(DatasetError) as e:
        get_training_dataset_dicts([a, b], "detectron2")
    assert f"dataset '{a}' has 2 images" in str(e.value) and f"dataset '{b}' has 5 images" in str(e.value)
    # With one annotated image in the second, training goes on with that image.
    images = write_images(tmp_path, [(40, 50)] * 5, "c")
    c = register({"images": images, "categories": CATEGORIES, "annotations": boxed(images, {4: [[1, 2, 10, 10]]})})
    assert [d["image_id"] for d in get_training_dataset_dicts([a, c], "detectron2")] == [4]


def test_the_images_left_out_as_unreadable_are_counted_too(tmp_path, register):
    images = write_images(tmp_path, [(40, 50)] * 3)
    os.remove(tmp_path / "2.png")  # the one annotated image's file is missing
    coco = {"images": images, "categories": CATEGORIES, "annotations": boxed(images, {2: [[1, 1, 9, 9]]})}
    name = register(coco, drop_unreadable_images=True)
    with pytest.raises(DatasetError) as e:
        get_training_dataset_dicts(name)
    assert f"dataset '{name}' has 2 images" in str(e.value)
    assert "1 of the 3 images of its JSON were left out before, their files unreadable (DATASETS.DROP_UNREADABLE_IMAGES)" in str(e.value)


# --- annotations of an image id that is not in "images"; a JSON without images; a null area ---


def orphan_dataset(tmp_path):
    images = write_images(tmp_path, [(40, 50)] * 2)
    annotations = boxed(images, {1: [[1, 1, 9, 9]], 2: [[2, 2, 9, 9]]})
    annotations.append(ann(77, 9, [1, 1, 5, 5], category_id=3, area=25, iscrowd=0))
    return write_json(tmp_path / "orphan.json", {"images": images, "annotations": annotations, "categories": CATEGORIES})


def test_an_annotation_of_an_unknown_image_id_is_refused_naming_file_annotation_and_image(
    tmp_path, register
):
    json_file = orphan_dataset(tmp_path)
    with pytest.raises(DatasetError) as e:
        register(json_file)
    message = str(e.value)
    assert f"'{json_file}': 1 annotations have an image_id that is not in 'images'" in message
    assert "annotation id 77 of image id 9: image_id 9" in message
    assert "--drop-unreadable-images (config DATASETS.DROP_UNREADABLE_IMAGES True)" in message


def test_with_the_drop_option_it_is_dropped_with_a_count_in_the_log(tmp_path, register, vfnet_log):
    with vfnet_log.at_level(logging.WARNING, logger="vfnet"):
        name = register(orphan_dataset(tmp_path), drop_unreadable_images=True)
    assert (
        "dropped: image id not in 'images' (DATASETS.DROP_UNREADABLE_IMAGES): 1 of 3 annotations (ids 77)"
        in vfnet_log.text
    )
    dicts = DatasetCatalog.get(name)
    assert sorted(a["bbox"][0] for d in dicts for a in d["annotations"]) == [1, 2]


def test_a_json_without_images_is_refused(tmp_path, register):
    with pytest.raises(DatasetError, match=r"\('.*\.json'\) has no images: its 'images' list is empty"):
        register({"images": [], "annotations": [], "categories": CATEGORIES})


def test_a_null_area_is_filled_like_a_missing_one(tmp_path, register):
    images = write_images(tmp_path, [(40, 50)])
    annotations = [ann(1, 1, [1, 2, 10, 4], area=None, iscrowd=0)]
    name = register({"images": images, "annotations": annotations, "categories": CATEGORIES})
    with open(MetadataCatalog.get(name).json_file) as f:
        assert json.load(f)["annotations"][0]["area"] == 40
