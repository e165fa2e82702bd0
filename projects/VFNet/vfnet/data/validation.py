"""
Checks of COCO-format datasets, done once when a dataset is registered (``--dataset``) so that a
broken file or annotation stops a run before training rather than hours into it.

Outcomes, per problem:

* refused (:class:`DatasetError`, naming the file, the entry and the key or value): a file that
  is not JSON or not COCO, an entry without a key Detectron2 reads, a bbox that is not 4
  numbers, an image size that is not positive, duplicate image / annotation / category ids, a
  category id that is not in "categories", an annotation whose image id is not in "images", an
  image file that is missing, unreadable, truncated or whose size is not the one in the JSON;
  unless, for the image ids and files, one asks (``--load-truncated-images``,
  ``--drop-unreadable-images``) for:
* loaded, with a warning per file: a truncated image file that decodes as far as its data goes
  (PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES``, set only while such a file is decoded: see
  :func:`truncated_images_loaded`; OpenCV decodes such a JPEG the same, with a warning);
* dropped, with a warning that counts and names them: image files that are missing or cannot be
  read (with their annotations, by the caller);
* dropped, with a warning that counts them: annotations of an image id not in "images" (with
  ``--drop-unreadable-images``);
* dropped, with a warning that counts them: boxes with NaN / inf / null coordinates, with zero
  or negative width or height, or wholly outside their image;
* fixed: boxes partly outside their image are clipped to it (their "area" capped at the clipped
  box's), with a warning that counts them; a missing "area" is set to the box's and a missing
  "iscrowd" to 0 (COCO evaluation reads both).

Pure Python + Pillow: no Detectron2.
"""

import contextlib
import json
import logging
import math
import os
import threading
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from PIL import Image, ImageFile
from tqdm import tqdm

__all__ = [
    "DatasetError",
    "ImageCheck",
    "LOAD_TRUNCATED_FLAG",
    "LOAD_TRUNCATED_KEY",
    "DROP_UNREADABLE_FLAG",
    "DROP_UNREADABLE_KEY",
    "load_coco_dict",
    "clean_coco_dict",
    "truncated_images_loaded",
    "inspect_image_file",
    "check_image_file",
    "check_image_files",
]

logger = logging.getLogger(__name__)

# How the options for damaged image files are named in messages: the flag of the tools that
# register datasets (tools/train_net.py, demo/demo.py) and the config key it sets.
LOAD_TRUNCATED_FLAG = "--load-truncated-images"
LOAD_TRUNCATED_KEY = "DATASETS.LOAD_TRUNCATED_IMAGES"
DROP_UNREADABLE_FLAG = "--drop-unreadable-images"
DROP_UNREADABLE_KEY = "DATASETS.DROP_UNREADABLE_IMAGES"

REQUIRED_KEYS = {
    "images": ("id", "file_name", "height", "width"),
    "annotations": ("id", "image_id", "category_id", "bbox"),
    "categories": ("id", "name"),
}
# EXIF orientations that turn the image by 90 or 270 degrees (Detectron2's read_image applies them).
TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)
MAX_LISTED = 10


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file, entry, key or value at fault."""


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _listed(items: List) -> str:
    """At most MAX_LISTED items, comma-separated, with a count of the rest."""
    text = ", ".join(str(x) for x in items[:MAX_LISTED])
    return text + (f", ... ({len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else "")


def load_coco_dict(json_file: str) -> dict:
    """
    Read a COCO instances JSON and check its structure: an object with lists "images" and
    "categories" and, unless it holds images only (a test set), "annotations", whose entries
    have the keys in REQUIRED_KEYS, with a bbox of 4 numbers (null for a missing coordinate) and
    positive image sizes.
    """
    try:
        with open(json_file, encoding="utf-8") as f:
            coco = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"'{json_file}' is not a JSON file: {e}.") from None
    if not isinstance(coco, dict):
        raise DatasetError(
            f"'{json_file}' is not a COCO instances file: it holds a JSON {type(coco).__name__}, "
            "not an object with 'images', 'annotations' and 'categories'."
        )
    for key, required in REQUIRED_KEYS.items():
        if key == "annotations" and key not in coco:
            continue
        if not isinstance(coco.get(key), list):
            raise DatasetError(
                f"'{json_file}' is not a COCO instances file: it has no '{key}' list "
                f"(its keys: {sorted(coco)})."
            )
        for i, entry in enumerate(coco[key]):
            missing = [k for k in required if not (isinstance(entry, dict) and k in entry)]
            if missing:
                raise DatasetError(
                    f"'{json_file}': {key}[{i}] has no {missing} (it is {entry!r:.200})."
                )
    for i, img in enumerate(coco["images"]):
        if not all(_is_number(img[k]) and img[k] > 0 for k in ("width", "height")):
            raise DatasetError(
                f"'{json_file}': images[{i}] (id {img['id']}) has width {img['width']!r} and "
                f"height {img['height']!r}; they must be positive numbers."
            )
    for i, img in enumerate(coco["images"]):
        if not (isinstance(img["file_name"], str) and img["file_name"]):
            raise DatasetError(
                f"'{json_file}': images[{i}] (id {img['id']}) has file_name "
                f"{img['file_name']!r}; it must be the image's path under the image directory."
            )
    for i, ann in enumerate(coco.get("annotations", [])):
        box = ann["bbox"]
        where = f"'{json_file}': annotations[{i}] (id {ann['id']}, image id {ann['image_id']})"
        if not (
            isinstance(box, list) and len(box) == 4 and all(_is_number(v) or v is None for v in box)
        ):
            raise DatasetError(f"{where} has bbox {box!r}; it must be [x, y, width, height].")
        # Optional keys, read by the evaluation (both) and MMDetection's training filter (area).
        if ann.get("area") is not None and not _is_number(ann["area"]):
            raise DatasetError(
                f"{where} has area {ann['area']!r}; it must be a number (or absent: it is then "
                "the box's)."
            )
        if "iscrowd" in ann and ann["iscrowd"] not in (0, 1):
            raise DatasetError(f"{where} has iscrowd {ann['iscrowd']!r}; it must be 0 or 1.")
    return coco


def _check_unique_ids(coco: dict, json_file: str) -> None:
    for key in ("categories", "images", "annotations"):
        counts = Counter(entry["id"] for entry in coco.get(key, []))
        duplicates = [i for i, n in counts.items() if n > 1]
        if duplicates:
            raise DatasetError(
                f"'{json_file}': {key} ids {_listed(duplicates)} appear more than once."
            )


def _unknown_ids(coco: dict, key: str, known: set) -> List[str]:
    """The annotations whose `key` (category_id, image_id) is not in `known`, described."""
    return [
        f"annotation id {a['id']} of image id {a['image_id']}: {key} {a[key]!r}"
        for a in coco.get("annotations", [])
        if a[key] not in known
    ]


def _check_category_ids(coco: dict, json_file: str) -> None:
    category_ids = {c["id"] for c in coco["categories"]}
    if not category_ids:
        raise DatasetError(f"'{json_file}' has no categories.")
    unknown = _unknown_ids(coco, "category_id", category_ids)
    if unknown:
        raise DatasetError(
            f"'{json_file}': {len(unknown)} annotations have a category_id that is not in "
            f"'categories' ({sorted(category_ids)}): {_listed(unknown)}."
        )


def _check_image_ids(coco: dict, json_file: str) -> None:
    unknown = _unknown_ids(coco, "image_id", {img["id"] for img in coco["images"]})
    if unknown:
        raise DatasetError(
            f"'{json_file}': {len(unknown)} annotations have an image_id that is not in "
            f"'images': {_listed(unknown)}. Fix the ids, or drop these annotations with "
            f"{DROP_UNREADABLE_FLAG} (config {DROP_UNREADABLE_KEY} True)."
        )


def _clean_box(ann: dict, width: float, height: float) -> Tuple[Optional[dict], List[str]]:
    """
    Returns:
        the annotation to keep (None to drop it), and what was done to it.
    """
    box = [math.nan if v is None else float(v) for v in ann["bbox"]]
    if not all(math.isfinite(v) for v in box):
        return None, ["dropped: bbox with NaN, inf or null coordinates"]
    x, y, w, h = box
    if w <= 0 or h <= 0:
        return None, ["dropped: bbox with zero or negative width or height"]
    x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
    if x2 <= x1 or y2 <= y1:
        return None, ["dropped: bbox wholly outside its image"]
    ann, done = dict(ann), []
    if (x1, y1, x2, y2) != (x, y, x + w, y + h):
        ann["bbox"] = [x1, y1, x2 - x1, y2 - y1]
        area = ann.get("area")
        ann["area"] = min(math.inf if area is None else area, (x2 - x1) * (y2 - y1))
        done.append("clipped: bbox partly outside its image")
    if ann.get("area") is None:
        ann["area"] = w * h
        done.append("filled: missing 'area' set to the box's")
    if "iscrowd" not in ann:
        ann["iscrowd"] = 0
        done.append("filled: missing 'iscrowd' set to 0")
    return ann, done


def clean_coco_dict(
    coco: dict, json_file: str, drop_unknown_images: bool = False
) -> Tuple[dict, Dict[str, List]]:
    """
    Check the ids of a dataset read by :func:`load_coco_dict` and clean its annotations (see the
    module docstring).

    Args:
        drop_unknown_images: drop the annotations whose image_id is not in "images" (counted
            in the returned actions) instead of refusing them (DATASETS.DROP_UNREADABLE_IMAGES).

    Returns:
        the cleaned dataset (the input is not modified), and for each thing done (a sentence
        starting with "dropped:", "clipped:" or "filled:"), the ids of the annotations it was
        done to.
    """
    _check_unique_ids(coco, json_file)
    _check_category_ids(coco, json_file)
    if not drop_unknown_images:
        _check_image_ids(coco, json_file)
    if "annotations" not in coco:
        return coco, {}
    images = {img["id"]: img for img in coco["images"]}
    kept, actions = [], defaultdict(list)
    for ann in coco["annotations"]:
        img = images.get(ann["image_id"])
        if img is None:
            actions[f"dropped: image id not in 'images' ({DROP_UNREADABLE_KEY})"].append(ann["id"])
            continue
        cleaned, done = _clean_box(ann, img["width"], img["height"])
        for action in done:
            actions[action].append(ann["id"])
        if cleaned is not None:
            kept.append(cleaned)
    return {**coco, "annotations": kept}, dict(actions)


def _jpeg_is_complete(path: str) -> bool:
    """Whether a JPEG file ends with the end-of-image marker (trailing zero bytes allowed)."""
    with open(path, "rb") as f:
        f.seek(max(os.path.getsize(path) - 1024, 0))
        return f.read().rstrip(b"\0").endswith(b"\xff\xd9")


# PIL's ImageFile.LOAD_TRUNCATED_IMAGES is a module global: it is set only under this lock, which
# every decode of this project that sets it holds.
_LOAD_TRUNCATED_LOCK = threading.RLock()


@contextlib.contextmanager
def truncated_images_loaded() -> Iterator[None]:
    """
    Within: PIL decodes a truncated image file as far as its data goes (a JPEG as if it ended
    there, which is what OpenCV does) instead of raising ``OSError: image file is truncated``.
    PIL's ``ImageFile.LOAD_TRUNCATED_IMAGES`` is set on entry, under a lock, and restored on exit;
    the project sets it only to decode again a file that failed, in one thread at a time (the
    checks of :func:`check_image_files` do so after their threads are done).
    """
    with _LOAD_TRUNCATED_LOCK:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            yield
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


class ImageCheck(NamedTuple):
    """What :func:`inspect_image_file` found."""

    # None if the file can be used, else what is wrong with it.
    problem: Optional[str] = None
    # Whether the problem is that the file is missing or cannot be read (not its size).
    unreadable: bool = False
    # The error PIL raises on the file when it is truncated but decodes as far as its data goes
    # (with truncated_images_loaded); None for a complete file.
    truncated: Optional[str] = None


def _error(e: Exception) -> str:
    return f"{type(e).__name__}: {e}"


def _read_size(path: str, truncated: bool = False) -> Tuple[Tuple[int, int], int]:
    """
    The (width, height) and EXIF orientation of an image file, after the header, PIL's `verify`
    (the chunk checksums of a PNG), and the decode of a JPEG without end marker; or, if
    `truncated`, after decoding it with :func:`truncated_images_loaded`. Raises if it fails.
    """
    if truncated:
        with truncated_images_loaded(), Image.open(path) as im:
            im.load()
            return im.size, im.getexif().get(0x0112, 1)
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:  # verify() leaves the image unusable
        if im.format == "JPEG" and not _jpeg_is_complete(path):
            im.load()
        return im.size, im.getexif().get(0x0112, 1)


def _size_problem(
    size: Tuple[int, int], orientation: int, width: int, height: int
) -> Optional[str]:
    if orientation in TRANSPOSING_ORIENTATIONS:
        size = size[::-1]
    if tuple(size) == (width, height):
        return None
    rotated = f" after its EXIF orientation {orientation}" if orientation != 1 else ""
    return f"is {size[0]}x{size[1]} (width x height){rotated}, but the JSON says {width}x{height}"


def _first_check(path: str, width: int, height: int) -> Tuple[ImageCheck, Optional[Exception]]:
    """The check of a file without truncated_images_loaded, and the error PIL raised on it."""
    if not os.path.isfile(path):
        return ImageCheck("does not exist", unreadable=True), None
    try:
        size, orientation = _read_size(path)
    except Exception as e:  # PIL raises many types for a broken file
        return ImageCheck(f"is not a readable image ({_error(e)})", unreadable=True), e
    return ImageCheck(_size_problem(size, orientation, width, height)), None


def _check_truncated(
    path: str, width: int, height: int, error: Exception, load_truncated: bool
) -> ImageCheck:
    """The check of a file that PIL failed to read with `error`: is it truncated (it decodes
    with truncated_images_loaded), and if so, can it be used?"""
    problem = f"is not a readable image ({_error(error)})"
    try:
        size, orientation = _read_size(path, truncated=True)
    except Exception:
        return ImageCheck(problem, unreadable=True)
    if not load_truncated:
        return ImageCheck(
            f"{problem}; it is truncated, and decodes as far as its data goes with "
            f"{LOAD_TRUNCATED_FLAG}",
            unreadable=True,
            truncated=_error(error),
        )
    return ImageCheck(_size_problem(size, orientation, width, height), truncated=_error(error))


def inspect_image_file(
    path: str, width: int, height: int, load_truncated: bool = False
) -> ImageCheck:
    """
    A fast check that an image file can be read and has the size the JSON gives it (after its
    EXIF orientation, as Detectron2's `read_image` applies it): the header, PIL's `verify` (the
    chunk checksums of a PNG), and the end marker of a JPEG (a JPEG without one is decoded).
    A file that fails is decoded again with :func:`truncated_images_loaded`: if it decodes, it is
    truncated (``truncated`` says how), and can be used if `load_truncated`.
    """
    check, error = _first_check(path, width, height)
    return check if error is None else _check_truncated(path, width, height, error, load_truncated)


def check_image_file(
    path: str, width: int, height: int, load_truncated: bool = False
) -> Optional[str]:
    """
    :func:`inspect_image_file`'s problem: None if the file is fine (with `load_truncated`, also
    if it is truncated but decodes), else what is wrong with it.
    """
    return inspect_image_file(path, width, height, load_truncated).problem


def check_image_files(
    images: List[dict],
    image_root: str,
    name: str,
    load_truncated: bool = False,
    drop_unreadable: bool = False,
) -> List[Tuple[dict, ImageCheck]]:
    """
    Check the files of the COCO "images" entries of dataset `name` with
    :func:`inspect_image_file`, in threads, with a progress bar for large datasets.

    Args:
        load_truncated: a truncated file that decodes as far as its data goes can be used; a
            warning names each.
        drop_unreadable: a file that is missing or cannot be read is no error: it is returned,
            for the caller to leave its image out of the dataset.

    Returns:
        the images entries whose files are missing or unreadable, with what was found of each
        (empty unless `drop_unreadable`).

    Raises:
        DatasetError: listing the files at fault, with their image ids, and the options that let
            the run go on.
    """
    paths = [os.path.join(image_root, img["file_name"]) for img in images]
    widths, heights = [img["width"] for img in images], [img["height"] for img in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        first = list(
            tqdm(
                pool.map(_first_check, paths, widths, heights),
                total=len(images),
                desc=f"Checking the images of '{name}'",
                disable=len(images) < 1000,
            )
        )
    # The files PIL failed to read are decoded again with truncated_images_loaded, once the
    # threads are done: no other check then runs with PIL's global flag set.
    results = [
        check if error is None else _check_truncated(path, w, h, error, load_truncated)
        for (check, error), path, w, h in zip(first, paths, widths, heights)
    ]
    for path, img, result in zip(paths, images, results):
        if load_truncated and result.truncated and not result.problem:
            logger.warning(
                f"Dataset '{name}': '{path}' (image id {img['id']}) is truncated "
                f"({result.truncated}); it is loaded as far as its data goes "
                f"({LOAD_TRUNCATED_KEY})."
            )
    dropped = [
        (img, result)
        for img, result in zip(images, results)
        if drop_unreadable and result.unreadable
    ]
    refused = [
        (path, img, result)
        for path, img, result in zip(paths, images, results)
        if result.problem and not (drop_unreadable and result.unreadable)
    ]
    if refused:
        problems = [f"'{path}' (image id {img['id']}) {r.problem}" for path, img, r in refused]
        options = []
        if not load_truncated and any(r.truncated for _, _, r in refused):
            options.append(
                f"{LOAD_TRUNCATED_FLAG} (config {LOAD_TRUNCATED_KEY} True) loads the truncated "
                "files as far as their data goes"
            )
        if not drop_unreadable and any(r.unreadable for _, _, r in refused):
            options.append(
                f"{DROP_UNREADABLE_FLAG} (config {DROP_UNREADABLE_KEY} True) leaves the images "
                "whose files are missing or cannot be read out of the dataset, with their "
                "annotations"
            )
        hint = (
            "\nTo go on without fixing the files: " + "; ".join(options) + "." if options else ""
        )
        raise DatasetError(
            f"Dataset '{name}': {len(problems)} of {len(images)} image files cannot be used:\n  "
            + "\n  ".join(problems[:MAX_LISTED])
            + (f"\n  ... ({len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else "")
            + hint
        )
    return dropped
