"""
Extreme scenes at the model level (finite losses and gradients, valid detections), and a
non-finite loss stopping training with the loss's name and the iteration.
"""

import itertools
import os
import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import get_cfg  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402

import vfnet  # noqa: E402
from vfnet.engine.train_loop import SimpleTrainer  # noqa: E402

from helpers import ROOT  # noqa: E402


def small_model(*opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "Base-VFNet.yaml"))
    cfg.merge_from_list([
        "MODEL.DEVICE", "cpu",
        "MODEL.RESNETS.DEPTH", "18",
        "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
        "MODEL.FPN.OUT_CHANNELS", "64",
        "MODEL.VFNET.NUM_CLASSES", "3",
        "MODEL.WEIGHTS", "",
        *opts,
    ])  # fmt: skip
    torch.manual_seed(0)
    return build_model(cfg)


def many_boxes(n, height, width):
    g = torch.Generator().manual_seed(0)
    xy = torch.rand(n, 2, generator=g) * torch.tensor([width, height])
    wh = torch.rand(n, 2, generator=g) * torch.tensor([width, height]) / 4 + 1
    boxes = torch.cat([xy, xy + wh], dim=1)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
    return boxes.tolist()


# name -> (height, width, boxes (x1, y1, x2, y2))
SCENES = {
    "smaller_than_the_largest_stride": (20, 20, [[2, 3, 15, 18]]),
    "elongated_64x2000": (64, 2000, [[10, 5, 300, 60], [1500, 0, 2000, 64]]),
    "boxes_of_1_and_2_pixels": (96, 128, [[10, 10, 11, 11], [50, 40, 52, 42], [127, 95, 128, 96]]),
    "box_covering_the_image": (96, 128, [[0, 0, 128, 96]]),
    "600_boxes": (96, 128, many_boxes(600, 96, 128)),
}


@pytest.fixture(scope="module")
def model():
    # FrozenBN, as the real configs: a batch of one image (2 x 3 features at res5 here) trains.
    return small_model("MODEL.VFNET.TEST_SCORE_THRESH", "0.0")


@pytest.mark.parametrize("scene", sorted(SCENES))
def test_extreme_scene_trains_with_finite_losses_and_detects_valid_boxes(model, scene):
    height, width, boxes = SCENES[scene]
    torch.manual_seed(1)
    image = torch.rand(3, height, width) * 255
    gt = Instances(
        (height, width),
        gt_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
        gt_classes=torch.arange(len(boxes)) % 3,
    )
    model.train()
    model.zero_grad()
    with EventStorage(0):
        losses = model([{"image": image, "instances": gt}])
    for name, value in losses.items():
        assert torch.isfinite(value), name
    sum(losses.values()).backward()
    for name, p in model.named_parameters():
        assert p.grad is None or torch.isfinite(p.grad).all(), name

    model.eval()
    with torch.no_grad():
        out = model([{"image": image}])[0]["instances"]
    assert len(out) > 0
    b = out.pred_boxes.tensor
    assert torch.isfinite(b).all() and torch.isfinite(out.scores).all()
    assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
    assert (b[:, 2] <= width).all() and (b[:, 3] <= height).all()
    assert (b[:, 2] >= b[:, 0]).all() and (b[:, 3] >= b[:, 1]).all()


def test_a_non_finite_loss_stops_training_naming_the_loss_and_the_iteration():
    model = small_model()
    batch = [
        {
            "image": torch.rand(3, 64, 96) * 255,
            "instances": Instances(
                (64, 96),
                gt_boxes=Boxes(torch.tensor([[8.0, 8, 60, 50]])),
                gt_classes=torch.tensor([1]),
            ),
        }
    ]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = SimpleTrainer(model, itertools.repeat(batch), optimizer)
    with torch.no_grad():
        model.head.cls_score.bias[1] = float("nan")  # as after a divergence
    with pytest.raises(FloatingPointError) as info:
        trainer.train(3, 6)
    message = str(info.value)
    assert message.startswith("Loss loss_cls became nan at iteration 3 (loss_bbox ")
    assert (
        "loss_cls nan): it first appears in the parameter head.cls_score.bias (an earlier step "
        "diverged). Training diverged (lower SOLVER.BASE_LR" in message
    )
