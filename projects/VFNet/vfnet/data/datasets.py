"""
Dataset registration with Detectron2: the embedded synthetic shapes dataset and users' own
COCO-format datasets given on the command line as NAME=JSON:IMAGE_DIR.
"""
import atexit
import json
import logging
import os
import tempfile
from typing import Dict, List, Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .shapes import SHAPE_CLASSES, ensure_shapes_dataset
from .validation import check_image_files, clean_coco_dict, load_coco_dict

logger = logging.getLogger(__name__)

SHAPES_DATASETS = {"vfnet_shapes_train": "train", "vfnet_shapes_val": "val"}
# The registered shapes dataset: objects of 16 px and more (see shapes.draw_scene).
SHAPES_PARAMS = {"min_object_size": 16}


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


def register_coco_dataset(spec: str, check_files: bool = True) -> str:
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

    Returns:
        the dataset name.
    """
    name, sep, paths = spec.partition("=")
    json_file, sep2, image_root = paths.partition(":")
    if not (sep and sep2 and name and json_file and image_root):
        raise ValueError(f"--dataset '{spec}': expected NAME=JSON:IMAGE_DIR.")
    if not os.path.isfile(json_file):
        raise FileNotFoundError(f"--dataset '{spec}': annotation file '{json_file}' does not exist.")
    if not os.path.isdir(image_root):
        raise FileNotFoundError(f"--dataset '{spec}': image directory '{image_root}' does not exist.")
    if name in DatasetCatalog.list():
        meta = MetadataCatalog.get(name)
        if meta.get("source_json_file") == json_file and meta.get("image_root") == image_root:
            return name
        raise ValueError(
            f"--dataset '{spec}': a different dataset named '{name}' is already registered."
        )

    coco = load_coco_dict(json_file)
    total = len(coco.get("annotations", []))
    coco, actions = clean_coco_dict(coco, json_file)
    _report_cleaning(name, json_file, actions, total)
    if not coco.get("annotations"):
        logger.warning(
            f"Dataset '{name}' ('{json_file}') has no annotations: it cannot be trained on, "
            "and its AP is undefined (NaN); the model's predictions on it are still written."
        )
    if check_files:
        check_image_files(coco["images"], image_root, name)

    categories = sorted(coco["categories"], key=lambda c: c["id"])
    register_coco_instances(
        name, {}, _write_temporary_json(coco, name) if actions else json_file, image_root
    )
    # What `load_coco_json` sets when it loads the dataset, known now for the checks of the
    # number of classes.
    MetadataCatalog.get(name).set(
        source_json_file=json_file,
        thing_classes=[c["name"] for c in categories],
        thing_dataset_id_to_contiguous_id={c["id"]: i for i, c in enumerate(categories)},
    )
    return name
