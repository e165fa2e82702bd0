"""
Dataset registration with Detectron2: the embedded synthetic shapes dataset and users' own
COCO-format datasets given on the command line as NAME=JSON:IMAGE_DIR.
"""
import atexit
import json
import logging
import os
import tempfile
from typing import Dict, Iterable, List, Optional, Tuple

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

from .shapes import SHAPE_CLASSES, ensure_shapes_dataset
from .validation import (
    DROP_UNREADABLE_KEY,
    LOAD_TRUNCATED_FLAG,
    LOAD_TRUNCATED_KEY,
    DatasetError,
    MAX_LISTED,
    check_image_files,
    clean_coco_dict,
    load_coco_dict,
)

logger = logging.getLogger(__name__)

SHAPES_DATASETS = {"vfnet_shapes_train": "train", "vfnet_shapes_val": "val"}
# The registered shapes dataset (see shapes.draw_scene): 96-128 px images, 1 to 3 objects per
# image, of 24 px and more, up to 0.6 of the image's shorter side, aspect ratios up to 2, upright
# (no rotation), at most 10% occluded, box IoU at most 0.2, on noise or gradient backgrounds; no
# empty images.
SHAPES_PARAMS = {
    "image_size": (96, 128),
    "min_object_size": 24,
    "max_object_frac": 0.6,
    "max_objects": 3,
    "max_aspect": 2.0,
    "max_rotation": 0.0,
    "max_occlusion": 0.1,
    "max_box_iou": 0.2,
    "empty_prob": 0.0,
    "backgrounds": ("noise", "gradient"),
}


def default_shapes_root() -> str:
    """Where the shapes dataset is generated: $DETECTRON2_DATASETS/vfnet_shapes (default ./datasets)."""
    return os.path.join(os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "vfnet_shapes")


def register_shapes_datasets(root: Optional[str] = None) -> None:
    """
    Register "vfnet_shapes_train" and "vfnet_shapes_val". The images are generated on first use
    (once; later uses read the cache under `root`).
    """
    root = root or default_shapes_root()
    for name, split in SHAPES_DATASETS.items():

        def load(name=name, split=split):
            json_file, image_root = ensure_shapes_dataset(root, **SHAPES_PARAMS)[split]
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            json_file=os.path.join(root, f"{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
        )


def _report_cleaning(name: str, json_file: str, actions: Dict[str, List], total: int) -> None:
    """Log what cleaning did to the `total` annotations: drops and clips warn, fills inform."""
    for action, ids in sorted(actions.items()):
        shown = ", ".join(str(i) for i in ids[:5]) + (", ..." if len(ids) > 5 else "")
        log = logger.info if action.startswith("filled") else logger.warning
        log(
            f"Dataset '{name}' ('{json_file}'): {action}: {len(ids)} of {total} annotations "
            f"(ids {shown})."
        )


def _write_temporary_json(coco: dict, name: str) -> str:
    """Write a dataset to a JSON file that is removed when the process exits."""
    fd, path = tempfile.mkstemp(prefix=f"vfnet_{name}_", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(coco, f)
    atexit.register(lambda: os.path.exists(path) and os.remove(path))
    return path


def _drop_images(coco: dict, image_ids: Iterable) -> dict:
    """The dataset without the images of `image_ids` and their annotations."""
    image_ids = set(image_ids)
    return {
        **coco,
        "images": [img for img in coco["images"] if img["id"] not in image_ids],
        "annotations": [a for a in coco.get("annotations", []) if a["image_id"] not in image_ids],
    }


def _report_dropped_images(
    name: str, json_file: str, coco: dict, dropped: List[dict], num_truncated: int = 0
) -> None:
    """Warn of the images left out of dataset `name` (`coco`, before they are)."""
    ids = {img["id"] for img in dropped}
    num_annotations = sum(a["image_id"] in ids for a in coco.get("annotations", []))
    total = len(coco["images"])
    listed = [f"'{img['file_name']}' (image id {img['id']})" for img in dropped[:MAX_LISTED]]
    if len(dropped) > MAX_LISTED:
        listed.append(f"... ({len(dropped) - MAX_LISTED} more)")
    logger.warning(
        f"Dataset '{name}' ('{json_file}'): dropped {len(dropped)} of {total} images, whose files "
        f"are missing or cannot be read ({DROP_UNREADABLE_KEY}), with their {num_annotations} "
        f"annotations: {', '.join(listed)}. Training and evaluation use the other "
        f"{total - len(dropped)} images."
        + (
            f" {num_truncated} of them are truncated, and decode as far as their data goes with "
            f"{LOAD_TRUNCATED_FLAG} ({LOAD_TRUNCATED_KEY} True)."
            if num_truncated
            else ""
        )
    )


def register_coco_dataset(
    spec: str,
    check_files: bool = True,
    load_truncated_images: bool = False,
    drop_unreadable_images: bool = False,
    drop_image_ids: Optional[Iterable] = None,
) -> str:
    """
    Register a COCO-format dataset from a "NAME=JSON:IMAGE_DIR" string (the `--dataset` option
    of the project's tools). Class names come from the JSON's categories.

    The JSON is checked and cleaned now (see :mod:`vfnet.data.validation`): a broken dataset
    raises a :class:`DatasetError` naming the file, entry and key at fault; invalid boxes are
    dropped or clipped with a warning that counts them. When cleaning changed anything, the
    dataset is loaded (with Detectron2's `load_coco_json`) and evaluated from a cleaned copy of
    the JSON, so that training and evaluation see the same boxes.

    Args:
        check_files: also check that every image file exists, is a complete image and has the
            size of the JSON (see :func:`check_image_files`).
        load_truncated_images: a truncated image file that decodes as far as its data goes
            passes the check, with a warning (DATASETS.LOAD_TRUNCATED_IMAGES; the data loaders
            read it so with that key).
        drop_unreadable_images: the images whose files are missing or cannot be read are left
            out of the dataset, with their annotations, with a warning that counts and names them
            (DATASETS.DROP_UNREADABLE_IMAGES); the files are then checked even if not
            `check_files`. The metadata's "dropped_images" lists their file names and
            "num_source_images" counts the JSON's images; the evaluation says how many it covers.
            So are the annotations whose image_id is not in the JSON's "images" (counted in a
            warning), which are refused without it.
        drop_image_ids: leave out these image ids instead, without checking the files: what
            the check of another process dropped (the DDP workers of tools/train_net.py take the
            main process's).

    Returns:
        the dataset name.
    """
    name, json_file, image_root = parse_dataset_spec(spec)
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("source_json_file") == json_file and meta.get("image_root") == image_root:
            return name
        raise ValueError(
            f"--dataset '{spec}': a different dataset named '{name}' is already registered."
        )
    coco, cleaned = load_clean_coco(name, json_file, drop_unknown_images=drop_unreadable_images)
    num_source_images = len(coco["images"])
    if drop_image_ids is not None:
        drop_image_ids = set(drop_image_ids)
        dropped = [img for img in coco["images"] if img["id"] in drop_image_ids]
        coco = leave_out_images(coco, name, json_file, dropped)
    elif check_files or drop_unreadable_images:
        coco, dropped = drop_unreadable(
            coco, name, json_file, image_root, load_truncated_images, drop_unreadable_images
        )
    else:
        dropped = []
    # The evaluator reads the ground truth from the metadata's json_file: the cleaned copy, without
    # the dropped images, whose boxes would otherwise count as missed.
    registered_json = _write_temporary_json(coco, name) if cleaned or dropped else json_file
    _register(name, coco, registered_json, json_file, image_root, num_source_images, dropped)
    return name


def parse_dataset_spec(spec: str) -> Tuple[str, str, str]:
    """(name, json file, image folder) of a "NAME=JSON:IMAGE_DIR" string whose files exist."""
    name, sep, paths = spec.partition("=")
    json_file, sep2, image_root = paths.partition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise ValueError(f"--dataset '{spec}': expected NAME=JSON:IMAGE_DIR.")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"--dataset '{spec}': annotation file '{json_file}' does not exist.")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--dataset '{spec}': image directory '{image_root}' does not exist.")
    return name, json_file, image_root


def load_clean_coco(name: str, json_file: str, drop_unknown_images: bool) -> Tuple[dict, bool]:
    """
    The COCO dict of `json_file`, checked and cleaned (:func:`clean_coco_dict`, logged), and
    whether cleaning changed it. Refuses a JSON without images; warns of one without annotations.
    """
    coco = load_coco_dict(json_file)
    total = len(coco.get("annotations", []))
    coco, actions = clean_coco_dict(coco, json_file, drop_unknown_images=drop_unknown_images)
    if not coco["images"]:
        raise DatasetError(f"Dataset '{name}' ('{json_file}') has no images: its 'images' list is empty.")
    _report_cleaning(name, json_file, actions, total)
    if not coco.get("annotations"):
        logger.warning(
            f"Dataset '{name}' ('{json_file}') has no annotations: it cannot be trained on, "
            "and its AP is undefined (NaN); the model's predictions on it are still written."
        )
    return coco, bool(actions)


def drop_unreadable(
    coco: dict, name: str, json_file: str, image_root: str, load_truncated: bool, drop: bool
) -> Tuple[dict, List[dict]]:
    """
    Check the image files of `coco` (:func:`check_image_files`: a bad one raises unless `drop`);
    returns `coco` without the images left out (:func:`leave_out_images`), and those images.
    """
    found = check_image_files(
        coco["images"], image_root, name, load_truncated=load_truncated, drop_unreadable=drop
    )
    dropped = [img for img, _ in found]
    num_truncated = sum(check.truncated is not None for _, check in found)
    return leave_out_images(coco, name, json_file, dropped, num_truncated), dropped


def leave_out_images(coco: dict, name: str, json_file: str, dropped: List[dict], num_truncated: int = 0) -> dict:
    """`coco` without the images `dropped` and their annotations, logged; refuses an empty one."""
    if not dropped:
        return coco
    _report_dropped_images(name, json_file, coco, dropped, num_truncated)
    num_images = len(coco["images"])
    coco = _drop_images(coco, [img["id"] for img in dropped])
    if not coco["images"]:
        raise DatasetError(
            f"Dataset '{name}' ('{json_file}'): none of its {num_images} image files "
            "can be read: there is no image left."
        )
    return coco


def _register(name, coco, registered_json, json_file, image_root, num_source_images, dropped) -> None:
    """
    Detectron2's register_coco_instances of `registered_json`, with the annotations' "area"
    loaded too (MMDetection's training-set filter reads it: DATALOADER.TRAIN_FILTER "mmdet"),
    and the metadata that `load_coco_json` sets, known now for the checks of the number of
    classes, with the source JSON and the images dropped.
    """
    categories = sorted(coco["categories"], key=lambda c: c["id"])
    DatasetCatalog.register(
        name, lambda: load_coco_json(registered_json, image_root, name, extra_annotation_keys=["area"])
    )
    MetadataCatalog.get(name).set(
        json_file=registered_json,
        image_root=image_root,
        evaluator_type="coco",
        source_json_file=json_file,
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
        num_source_images=num_source_images,
        dropped_images=[img["file_name"] for img in dropped],
        dropped_image_ids=[img["id"] for img in dropped],
    )
