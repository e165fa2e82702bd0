"""
Non-finite features and head outputs through `forward_inference`, as Detectron2's own test of its
dense detectors (tests/modeling/test_model_e2e.py, RetinaNetE2ETest.test_inf_nan_data): no
exception, and no detection that is finite. The R-50 VFNet of Base-VFNet.yaml on a 512x512 image
(Detectron2's size), with each CPU deformable-conv kernel.
"""

import pytest
import torch

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import ImageList  # noqa: E402

from helpers import small_cfg  # noqa: E402

KERNELS = ("gather", "sampling", "torchvision")
# The R-50-FPN of Base-VFNet.yaml (256 channels), 3 classes.
R50 = ["MODEL.RESNETS.DEPTH", "50", "MODEL.RESNETS.RES2_OUT_CHANNELS", "256",
       "MODEL.FPN.OUT_CHANNELS", "256", "MODEL.RESNETS.NORM", "FrozenBN"]  # fmt: skip


def inf_tensor(*shape):
    return 1.0 / torch.zeros(*shape)


def nan_tensor(*shape):
    return torch.full(shape, float("nan"))


def build(kernel):
    cfg = small_cfg(*R50, "MODEL.VFNET.DEFORM_CONV_IMPL", kernel)
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.test_score_thresh = -1.0  # every candidate passes (Detectron2's test: -999999999)
    return model


def features_of(make, size=512, channels=256):
    return [make(1, channels, size // s, size // s) for s in (8, 16, 32, 64, 128)]


@pytest.fixture(scope="module", params=KERNELS)
def model(request):
    return build(request.param)


@pytest.mark.parametrize("make", [inf_tensor, nan_tensor], ids=["inf", "nan"])
def test_non_finite_features_and_head_outputs_give_no_finite_detection(model, make):
    images = ImageList(make(1, 3, 512, 512), [(510, 510)])
    features = features_of(make)
    with torch.no_grad():
        # The head on non-finite features (the deformable convs read non-finite offsets) ...
        predictions = model.head(features)
        det = model.forward_inference(images, features, predictions)
        assert len(det) == 1
        if len(det[0]):
            assert torch.isfinite(det[0].pred_boxes.tensor).sum() == 0
        # ... and non-finite head outputs of the head's shapes.
        predictions = [[make(*x.shape) for x in p] for p in predictions]
        det = model.forward_inference(images, features, predictions)
    assert len(det) == 1
    if len(det[0]):
        assert torch.isfinite(det[0].pred_boxes.tensor).sum() == 0


def test_one_infinite_box_is_dropped_and_the_others_are_kept():
    """A candidate whose distances are infinite is dropped and the rest detected as before:
    the same detections as when that candidate's score is below the threshold (with every
    candidate above it kept: the dropped one takes a place among the top k before it is dropped,
    as a box clipped to nothing does)."""
    model = build("gather")
    model.test_score_thresh = 0.05
    model.test_topk_candidates = 10**6
    torch.manual_seed(1)
    images = ImageList(torch.zeros(1, 3, 512, 512), [(512, 512)])
    features = features_of(torch.randn)
    with torch.no_grad():
        logits, boxes_init, boxes_refine = model.head(features)
    # Confident scores (without ties) at a few places of P3, so that there are detections.
    logits[0][0, :, 10:30:4, 10:30:4] = 4.0 + torch.rand(3, 5, 5)
    reference = model.forward_inference(images, features, [logits, boxes_init, boxes_refine])[0]
    assert len(reference) > 5
    # Make the refined box of P3's location (14, 14) infinite (its init box stays finite) ...
    infinite = [x.clone() for x in boxes_refine]
    infinite[0][0, :, 14, 14] = float("inf")
    det = model.forward_inference(images, features, [logits, boxes_init, infinite])[0]
    # ... which is the same as that location not being a candidate.
    below = [x.clone() for x in logits]
    below[0][0, :, 14, 14] = -20.0
    expected = model.forward_inference(images, features, [below, boxes_init, boxes_refine])[0]
    assert len(det) == len(expected) < len(reference)
    assert torch.equal(det.pred_boxes.tensor, expected.pred_boxes.tensor)
    assert torch.equal(det.scores, expected.scores)
    assert torch.equal(det.pred_classes, expected.pred_classes)
