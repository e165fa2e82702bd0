"""
At the start of a VFNet training, a warning when a large share of the training boxes after the
resize is too small for the grid of P3 (vfnet/data/detection_utils.py), computed from the
training set that the data loader reads.
"""
import logging

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import load_config  # noqa: E402

KEY = "INPUT.MIN_SIZE_TRAIN"


@pytest.fixture(scope="module")
def small_objects(tmp_path_factory):
    """Training images of 96-128 px with 1 to 6 objects of 6-15 px, registered as a dataset."""
    from vfnet.data.datasets import register_coco_dataset
    from vfnet.data.shapes import generate_split

    root = tmp_path_factory.mktemp("small_objects")
    generate_split(str(root), "train", 12, seed=0, image_size=(96, 128), min_object_size=6,
                   max_object_frac=0.12, max_objects=6, empty_prob=0.0)  # fmt: skip
    return register_coco_dataset(f"anchor_fit_train={root / 'train.json'}:{root / 'train'}")


def warnings_at_start(cfg, caplog, monkeypatch):
    """The warnings logged while the trainer's data loader is built from `cfg`."""
    from detectron2.utils import logger as d2_logger

    from vfnet.engine import Trainer

    monkeypatch.setattr(d2_logger, "_LOG_COUNTER", type(d2_logger._LOG_COUNTER)())  # once per process
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        Trainer.build_train_loader(cfg)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and KEY in r.getMessage()]


def test_tiny_boxes_warn_with_the_keys_and_the_suggested_sizes(small_objects, caplog, monkeypatch):
    """The warning names the share, the limit (1.5 x 8 px) and input sizes; at those sizes the
    same training set gives no warning (the suggestion is enough)."""
    import re

    dataset = ("DATASETS.TRAIN", f"('{small_objects}',)")
    (message,) = warnings_at_start(load_config("VFNet_Shapes_Demo.yaml", *dataset), caplog, monkeypatch)
    assert re.search(r"\d+% of the \d+ training boxes are under 12 px", message), message
    assert "MODEL.VFNET.ATSS.ANCHOR_SCALE does not change that" in message
    short, longest = re.search(r"INPUT.MIN_SIZE_TRAIN \((\d+),\), MAX_SIZE_TRAIN (\d+)", message).groups()
    assert int(short) > 96 and int(longest) > 128
    cfg = load_config("VFNet_Shapes_Demo.yaml", *dataset, "INPUT.MIN_SIZE_TRAIN", f"({short},)",
                      "INPUT.MAX_SIZE_TRAIN", longest)  # fmt: skip
    assert warnings_at_start(cfg, caplog, monkeypatch) == []


def test_the_demo_set_does_not_warn(caplog, monkeypatch):
    """The shapes demo (objects of 24 px and more) fits the default anchors."""
    assert warnings_at_start(load_config("VFNet_Shapes_Demo.yaml"), caplog, monkeypatch) == []
