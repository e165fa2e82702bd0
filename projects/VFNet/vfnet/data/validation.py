"""
Checks of COCO-format datasets, done once when a dataset is registered (``--dataset``) so that a
broken file or annotation stops a run before training rather than hours into it.

Outcomes, per problem:

* refused (:class:`DatasetError`, naming the file, the entry and the key or value): a file that
  is not JSON or not COCO, an entry without a key Detectron2 reads, a bbox that is not 4
  numbers, an image size that is not positive, duplicate image / annotation / category ids, a
  category id that is not in "categories", an image file that is missing, unreadable, truncated
  or whose size is not the one in the JSON;
* dropped, with a warning that counts them: annotations of an image id not in "images", boxes
  with NaN / inf / null coordinates, with zero or negative width or height, or wholly outside
  their image;
* fixed: boxes partly outside their image are clipped to it (their "area" capped at the clipped
  box's), with a warning that counts them; a missing "area" is set to the box's and a missing
  "iscrowd" to 0 (COCO evaluation reads both).

Pure Python + Pillow: no Detectron2.
"""

import json
import math
import os
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Dict, List, Optional, Tuple

from PIL import Image
from tqdm import tqdm

__all__ = [
    "DatasetError",
    "load_coco_dict",
    "clean_coco_dict",
    "check_image_file",
    "check_image_files",
]

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
    for i, ann in enumerate(coco.get("annotations", [])):
        box = ann["bbox"]
        if not (
            isinstance(box, list) and len(box) == 4 and all(_is_number(v) or v is None for v in box)
        ):
            raise DatasetError(
                f"'{json_file}': annotations[{i}] (id {ann['id']}, image id {ann['image_id']}) has "
                f"bbox {box!r}; it must be [x, y, width, height]."
            )
    return coco


def _check_unique_ids(coco: dict, json_file: str) -> None:
    for key in ("categories", "images", "annotations"):
        counts = Counter(entry["id"] for entry in coco.get(key, []))
        duplicates = [i for i, n in counts.items() if n > 1]
        if duplicates:
            raise DatasetError(
                f"'{json_file}': {key} ids {_listed(duplicates)} appear more than once."
            )


def _check_category_ids(coco: dict, json_file: str) -> None:
    category_ids = {c["id"] for c in coco["categories"]}
    if not category_ids:
        raise DatasetError(f"'{json_file}' has no categories.")
    unknown = [
        f"annotation id {a['id']} of image id {a['image_id']}: category_id {a['category_id']!r}"
        for a in coco.get("annotations", [])
        if a["category_id"] not in category_ids
    ]
    if unknown:
        raise DatasetError(
            f"'{json_file}': {len(unknown)} annotations have a category_id that is not in "
            f"'categories' ({sorted(category_ids)}): {_listed(unknown)}."
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
        ann["area"] = min(ann.get("area", math.inf), (x2 - x1) * (y2 - y1))
        done.append("clipped: bbox partly outside its image")
    if "area" not in ann:
        ann["area"] = w * h
        done.append("filled: missing 'area' set to the box's")
    if "iscrowd" not in ann:
        ann["iscrowd"] = 0
        done.append("filled: missing 'iscrowd' set to 0")
    return ann, done


def clean_coco_dict(coco: dict, json_file: str) -> Tuple[dict, Dict[str, List]]:
    """
    Check the ids of a dataset read by :func:`load_coco_dict` and clean its annotations (see the
    module docstring).

    Returns:
        the cleaned dataset (the input is not modified), and for each thing done (a sentence
        starting with "dropped:", "clipped:" or "filled:"), the ids of the annotations it was
        done to.
    """
    _check_unique_ids(coco, json_file)
    _check_category_ids(coco, json_file)
    if "annotations" not in coco:
        return coco, {}
    images = {img["id"]: img for img in coco["images"]}
    kept, actions = [], defaultdict(list)
    for ann in coco["annotations"]:
        img = images.get(ann["image_id"])
        if img is None:
            actions["dropped: image id not in 'images'"].append(ann["id"])
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


def check_image_file(path: str, width: int, height: int) -> Optional[str]:
    """
    A fast check that an image file can be read and has the size the JSON gives it (after its
    EXIF orientation, as Detectron2's `read_image` applies it): the header, PIL's `verify` (the
    chunk checksums of a PNG), and the end marker of a JPEG (a JPEG without one is decoded).

    Returns:
        None if the file is fine, else what is wrong with it.
    """
    if not os.path.isfile(path):
        return "does not exist"
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:  # verify() leaves the image unusable
            size, orientation = im.size, im.getexif().get(0x0112, 1)
            if im.format == "JPEG" and not _jpeg_is_complete(path):
                im.load()
    except Exception as e:  # PIL raises many types for a broken file
        return f"is not a readable image ({type(e).__name__}: {e})"
    if orientation in TRANSPOSING_ORIENTATIONS:
        size = size[::-1]
    if tuple(size) != (width, height):
        rotated = f" after its EXIF orientation {orientation}" if orientation != 1 else ""
        return (
            f"is {size[0]}x{size[1]} (width x height){rotated}, but the JSON says "
            f"{width}x{height}"
        )
    return None


def check_image_files(images: List[dict], image_root: str, name: str) -> None:
    """
    Check the files of the COCO "images" entries of dataset `name` with
    :func:`check_image_file`, in threads, with a progress bar for large datasets.

    Raises:
        DatasetError: listing the files at fault, with their image ids.
    """
    paths = [os.path.join(image_root, img["file_name"]) for img in images]
    widths, heights = [img["width"] for img in images], [img["height"] for img in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(
            tqdm(
                pool.map(check_image_file, paths, widths, heights),
                total=len(images),
                desc=f"Checking the images of '{name}'",
                disable=len(images) < 1000,
            )
        )
    problems = [
        f"'{path}' (image id {img['id']}) {problem}"
        for path, img, problem in zip(paths, images, results)
        if problem
    ]
    if problems:
        raise DatasetError(
            f"Dataset '{name}': {len(problems)} of {len(images)} image files cannot be used:\n  "
            + "\n  ".join(problems[:MAX_LISTED])
            + (f"\n  ... ({len(problems) - MAX_LISTED} more)" if len(problems) > MAX_LISTED else "")
        )
