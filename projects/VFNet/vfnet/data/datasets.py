"""
Dataset registration with Detectron2: the embedded synthetic shapes dataset and users' own
COCO-format datasets given on the command line as NAME=JSON:IMAGE_DIR.
"""
import os
from typing import Optional

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, register_coco_instances

from .shapes import SHAPE_CLASSES, ensure_shapes_dataset

SHAPES_DATASETS = {"vfnet_shapes_train": "train", "vfnet_shapes_val": "val"}


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
            json_file, image_root = ensure_shapes_dataset(root)[split]
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(name, load)
        MetadataCatalog.get(name).set(
            thing_classes=list(SHAPE_CLASSES),
            json_file=os.path.join(root, f"{split}.json"),
            image_root=os.path.join(root, split),
            evaluator_type="coco",
        )


def register_coco_dataset(spec: str) -> str:
    """
    Register a COCO-format dataset from a "NAME=JSON:IMAGE_DIR" string (the `--dataset` option
    of the project's tools). Class names come from the JSON's categories.

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
        if meta.get("json_file") == json_file and meta.get("image_root") == image_root:
            return name
        raise ValueError(
            f"--dataset '{spec}': a different dataset named '{name}' is already registered."
        )
    register_coco_instances(name, {}, json_file, image_root)
    return name
