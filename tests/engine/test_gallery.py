"""The pictures at the end of a run: the grid of images and the detections drawn on them."""
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402

from vfnet.utils.gallery import draw_detections, tile_images  # noqa: E402


def test_tile_images_places_each_image_in_its_cell_on_white():
    a = np.full((2, 3, 3), 10, np.uint8)
    b = np.full((3, 2, 3), 20, np.uint8)
    c = np.full((1, 1, 3), 30, np.uint8)
    grid = tile_images([a, b, c], columns=2, gap=1)
    # Cells of 3 x 3 (the largest height and width), 2 per row, 1 pixel apart: 2 rows.
    assert grid.shape == (3 + 1 + 3, 3 + 1 + 3, 3)
    assert (grid[0:2, 0:3] == 10).all() and (grid[2, 0:3] == 255).all()
    assert (grid[0:3, 4:6] == 20).all() and (grid[0:3, 6] == 255).all()
    assert (grid[4, 0] == 30).all() and (grid[4, 1:] == 255).all() and (grid[5:] == 255).all()
    assert (grid[:, 3] == 255).all() and (grid[3, :] == 255).all()  # the gaps


class OneDetectionPerScore(torch.nn.Module):
    """Predicts a box at (10, 10)-(40, 30) scoring 0.9 and one at (110, 80)-(150, 110) scoring 0.1."""

    def forward(self, inputs):
        instances = Instances((120, 160))
        instances.pred_boxes = Boxes(torch.tensor([[10.0, 10, 40, 30], [110, 80, 150, 110]]))
        instances.scores = torch.tensor([0.9, 0.1])
        instances.pred_classes = torch.tensor([0, 0])
        return [{"instances": instances} for _ in inputs]


@pytest.fixture
def one_image(tmp_path):
    """A 120 x 160 image of a horizontal gradient (column x has value 50 + x // 2) as a
    dataset of one, and its metadata."""
    image = np.repeat((50 + np.arange(160) // 2).astype(np.uint8)[None, :, None], 120, axis=0)
    image = np.repeat(image, 3, axis=2)
    Image.fromarray(image).save(tmp_path / "a.png")
    dicts = [{"file_name": str(tmp_path / "a.png"), "image_id": 1, "height": 120, "width": 160}]
    metadata = MetadataCatalog.get("gallery_test")
    metadata.thing_classes = ["thing"]
    return image, dicts, metadata


def test_detections_above_the_threshold_are_drawn_on_the_original_image(one_image):
    image, dicts, metadata = one_image
    model = OneDetectionPerScore().train()
    (drawing,) = draw_detections(model, lambda d: d, dicts, metadata, score_thresh=0.3, min_size=120)
    assert model.training  # given back in its mode
    assert drawing.shape == (120, 160, 3) and drawing.dtype == np.uint8
    changed = (drawing.astype(int) - image).any(axis=2)
    # The 0.9 box's outline is drawn; the 0.1 box is not (nothing inside its region changes).
    assert changed[10:31, 10].mean() > 0.8 and changed[10, 10:41].mean() > 0.8
    assert not changed[78:113, 108:153].any()


def test_small_images_are_drawn_enlarged_to_the_minimum_size(one_image):
    image, dicts, metadata = one_image
    (drawing,) = draw_detections(OneDetectionPerScore(), lambda d: d, dicts, metadata, 0.3, min_size=360)
    # x3: the shorter side 120 -> 360, each pixel a 3 x 3 block.
    assert drawing.shape == (360, 480, 3)
    enlarged = np.repeat(np.repeat(image, 3, axis=0), 3, axis=1)
    changed = (drawing.astype(int) - enlarged).any(axis=2)
    # The 0.9 box (10, 10)-(40, 30) at x3: (30, 30)-(120, 90); elsewhere the enlarged image.
    assert changed[30:91, 30].mean() > 0.8 and changed[30, 30:121].mean() > 0.8
    assert not changed[100:170, 160:240].any() and not changed[234:339, 324:459].any()


def test_the_pictures_are_made_when_training_completes_and_not_after_a_failure(tmp_path, caplog):
    import json
    import logging
    from types import SimpleNamespace

    from vfnet.engine.hooks import Pictures

    with open(tmp_path / "metrics.json", "w") as f:
        for it in range(3):
            f.write(json.dumps({"iteration": it, "total_loss": 1.0 / (it + 1), "lr": 0.01}) + "\n")
    drawn = []

    def write_gallery(model):
        drawn.append(model)
        return str(tmp_path / "detections.png")

    results = {"bbox": {"AP": 12.345, "AP50": 30.0, "AP75": 10.0}}
    hook = Pictures(str(tmp_path), write_gallery, lambda: results)
    model = torch.nn.Linear(1, 1)
    # Detectron2's trainer after an exception at iteration 1 of 3: iter 1; completed: iter 3.
    hook.trainer = SimpleNamespace(iter=1, max_iter=3, model=model)
    hook.after_train()
    assert drawn == [] and not (tmp_path / "losses.png").exists()
    hook.trainer.iter = 3
    # The hook's logger, directly: Detectron2's setup_logger (earlier tests) stops "vfnet" from
    # propagating to the root logger that caplog listens to.
    hook_logger = logging.getLogger("vfnet.engine.hooks")
    hook_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.INFO, logger="vfnet.engine.hooks"):
            hook.after_train()
    finally:
        hook_logger.removeHandler(caplog.handler)
    assert drawn == [model] and (tmp_path / "losses.png").exists()
    assert "bbox: AP 12.3, AP50 30.0, AP75 10.0" in caplog.text
    assert f"Pictures: {tmp_path / 'detections.png'}, " in caplog.text
