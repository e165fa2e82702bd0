"""
At the start of a VFNet training, a warning when a large share of the training boxes after the
resize is much smaller than the smallest ATSS anchor (vfnet/data/detection_utils.py), computed
from the training set that the data loader reads.
"""
import logging

import pytest

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from helpers import load_config  # noqa: E402

KEY = "MODEL.VFNET.ATSS.ANCHOR_SCALE"


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
    with caplog.at_level(logging.WARNING):
        Trainer.build_train_loader(cfg)
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and KEY in r.getMessage()]


def test_small_boxes_warn_with_the_key_and_the_suggested_value(small_objects, caplog, monkeypatch):
    cfg = load_config("VFNet_Shapes_Demo.yaml", "DATASETS.TRAIN", f"('{small_objects}',)")
    (message,) = warnings_at_start(cfg, caplog, monkeypatch)
    assert "% of the" in message and "smaller than 16 px" in message
    assert f"{KEY} 8 x stride 8" in message
    assert f"{KEY} 4 (smallest anchor 32 px)" in message or f"{KEY} 3 (smallest anchor 24 px)" in message


def test_no_warning_when_the_anchor_or_the_input_scale_fits(small_objects, caplog, monkeypatch):
    """The same boxes with ANCHOR_SCALE 2 (16 px anchors), or at 4x the input size."""
    dataset = ("DATASETS.TRAIN", f"('{small_objects}',)")
    cfg = load_config("VFNet_Shapes_Demo.yaml", *dataset, KEY, "2")
    assert warnings_at_start(cfg, caplog, monkeypatch) == []
    cfg = load_config("VFNet_Shapes_Demo.yaml", *dataset, "INPUT.MIN_SIZE_TRAIN", "(384,)", "INPUT.MAX_SIZE_TRAIN", "512")
    assert warnings_at_start(cfg, caplog, monkeypatch) == []


def test_the_demo_set_does_not_warn(caplog, monkeypatch):
    """The shapes demo (objects of 24 px and more) fits the default anchors."""
    assert warnings_at_start(load_config("VFNet_Shapes_Demo.yaml"), caplog, monkeypatch) == []
