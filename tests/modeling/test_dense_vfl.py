"""
Detectron2's RetinaNet and FCOS with the varifocal / quality focal loss
(vfnet/modeling/meta_arch/iou_aware_dense.py): the IoU-aware targets, the loss values against
hand-worked cases and an independent computation, the switch leaving the box losses alone, and
tools/train_net.py / tools/lazyconfig_train_net.py end to end.
"""
import math
import os
import re
import subprocess
import sys

import pytest
import torch

from vfnet.modeling.losses import quality_focal_loss, varifocal_loss

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.config import LazyConfig, get_cfg, instantiate  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.modeling.meta_arch.fcos import FCOS  # noqa: E402
from detectron2.modeling.meta_arch.retinanet import RetinaNet  # noqa: E402
from detectron2.structures import Boxes, ImageList, Instances  # noqa: E402
from detectron2.utils.events import EventStorage  # noqa: E402
from fvcore.nn import sigmoid_focal_loss  # noqa: E402
from torchvision.ops import box_iou  # noqa: E402

import vfnet  # noqa: E402
from vfnet.modeling.meta_arch import IoUAwareFCOS, IoUAwareRetinaNet  # noqa: E402
from vfnet.modeling.meta_arch.iou_aware_dense import iou_aware_targets  # noqa: E402

from helpers import ROOT, dataset_specs, tiny_shapes  # noqa: E402
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------
# The losses on hand-worked cases
# ---------------------------------------------------------------------------------------------


def test_losses_on_hand_worked_cases():
    # logit 0: p = 1/2, BCE(0, q) = ln 2 for any q. logit ln 3: p = 3/4.
    # q = 0.9 at p = 3/4: BCE = -(0.9 ln 0.75 + 0.1 ln 0.25) = 0.9 * 0.2876821 + 0.1 * 1.3862944
    #                          = 0.3975433.
    bce = 0.9 * math.log(4 / 3) + 0.1 * math.log(4)
    cases = [
        # (logit, q, VFL, QFL)
        (0.0, 0.5, 0.5 * LN2, 0.0),  # positive: q x BCE; QFL: BCE x |0.5 - 0.5|^2 = 0
        (0.0, 0.0, 0.75 * 0.25 * LN2, 0.25 * LN2),  # negative: 0.75 p^2 BCE; QFL p^2 BCE
        (math.log(3), 0.9, 0.9 * bce, bce * 0.15**2),  # |0.9 - 0.75| = 0.15
        (math.log(3), 0.0, 0.75 * 0.5625 * math.log(4), 0.5625 * math.log(4)),  # BCE(.., 0) = ln 4
    ]
    for logit, q, vfl, qfl in cases:
        x, t = torch.tensor([[logit]], dtype=torch.float64), torch.tensor([[q]], dtype=torch.float64)
        assert float(varifocal_loss(x, t, 0.75, 2.0)) == pytest.approx(vfl, rel=1e-12, abs=1e-15)
        assert float(quality_focal_loss(x, t, 2.0)) == pytest.approx(qfl, rel=1e-12, abs=1e-15)
    # Detectron2's focal loss (alpha 0.25, gamma 2) at logit 0: target 1: 0.25 (1 - p)^2 ln 2;
    # target 0: 0.75 p^2 ln 2, which is VFL's negative term.
    fl = sigmoid_focal_loss(torch.zeros(2), torch.tensor([1.0, 0.0]), 0.25, 2.0, reduction="none")
    assert fl.tolist() == pytest.approx([0.25 * 0.25 * LN2, 0.75 * 0.25 * LN2], rel=1e-6)


def test_quality_focal_loss_is_gfls_formula_written_per_element():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.zeros(50, 4, dtype=torch.float64)
    targets[torch.arange(0, 50, 3), torch.arange(0, 50, 3) % 4] = torch.rand(17, generator=g, dtype=torch.float64)
    want = 0.0
    for x, q in zip(logits.flatten().tolist(), targets.flatten().tolist()):
        p = 1 / (1 + math.exp(-x))
        want += -(q * math.log(p) + (1 - q) * math.log(1 - p)) * abs(q - p) ** 2
    assert float(quality_focal_loss(logits, targets, beta=2.0)) == pytest.approx(want, rel=1e-10)


# ---------------------------------------------------------------------------------------------
# The targets
# ---------------------------------------------------------------------------------------------


def test_targets_hand_worked_pair_and_labels():
    # (0, 0, 2, 2) and (1, 1, 3, 3): intersection 1, union 4 + 4 - 1 = 7.
    pred = torch.tensor([[[0.0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 4, 4]]])
    gt = torch.tensor([[[1.0, 1, 3, 3], [1, 1, 3, 3], [1, 1, 3, 3], [0, 0, 2, 2]]])
    labels = torch.tensor([[2, -1, 3, 0]])  # positive class 2, ignored, background (K = 3), class 0
    t = iou_aware_targets(pred, gt, labels, num_classes=3)
    want = torch.zeros(1, 4, 3)
    want[0, 0, 2] = 1 / 7
    want[0, 3, 0] = 4 / 16
    torch.testing.assert_close(t, want, rtol=1e-6, atol=0)


def test_targets_equal_torchvision_iou_of_the_decoded_boxes():
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(2, 300, 2, generator=g) * 500
    pred = torch.cat([xy, xy + 1 + torch.rand(2, 300, 2, generator=g) * 200], dim=2)
    xy = torch.rand(2, 300, 2, generator=g) * 500
    gt = torch.cat([xy, xy + 1 + torch.rand(2, 300, 2, generator=g) * 200], dim=2)
    labels = torch.randint(-1, 6, (2, 300), generator=g)  # K = 5: 5 is background
    t = iou_aware_targets(pred, gt, labels, num_classes=5)
    for i in range(2):
        iou = box_iou(pred[i], gt[i]).diagonal()
        for r in range(300):
            want = torch.zeros(5)
            if 0 <= labels[i, r] < 5:
                want[labels[i, r]] = iou[r]
            torch.testing.assert_close(t[i, r], want, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The detectors' losses, at a user's image size (800 x 1333)
# ---------------------------------------------------------------------------------------------


def retinanet_cfg(loss, *opts):
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "RetinaNet_VFL_R_50_FPN_1x.yaml"))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18",
                         "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
                         "MODEL.RETINANET.NUM_CLASSES", "3", "MODEL.RETINANET.CLS_LOSS_TYPE", loss,
                         *opts])  # fmt: skip
    return cfg


def gt_instances(image_size=(800, 1333)):
    inst = Instances(image_size)
    inst.gt_boxes = Boxes(torch.tensor([[100.0, 120.0, 420.0, 380.0], [700.0, 300.0, 1250.0, 780.0],
                                        [40.0, 600.0, 90.0, 660.0]]))  # fmt: skip
    inst.gt_classes = torch.tensor([0, 2, 1])
    return [inst]


def dense_inputs(model, num_outputs, seed=3, image_size=(800, 1333)):
    """Per level anchors, and random predictions (N = 1, Hi*Wi*A, K / 4 / 1) for an image."""
    strides = [8, 16, 32, 64, 128]
    shapes = [(math.ceil(image_size[0] / s), math.ceil(image_size[1] / s)) for s in strides]
    features = [torch.zeros(1, 1, h, w) for h, w in shapes]
    anchors = model.anchor_generator(features)
    g = torch.Generator().manual_seed(seed)
    preds = [[torch.randn(1, len(a), c, generator=g) * s for a in anchors] for c, s in num_outputs]
    return anchors, preds


def decode_retinanet(deltas, anchors):
    """Box2BoxTransform with unit weights, written out: centre + d * size, size x exp(d)."""
    w, h = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    cx, cy = anchors[:, 0] + w / 2, anchors[:, 1] + h / 2
    cx, cy = cx + deltas[:, 0] * w, cy + deltas[:, 1] * h
    w, h = w * deltas[:, 2].exp(), h * deltas[:, 3].exp()
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=1)


def decode_fcos(deltas, anchors):
    """FCOS's (l, t, r, b) in units of the stride (the anchor's side) from the location."""
    s = anchors[:, 2:3] - anchors[:, 0:1]
    c = (anchors[:, :2] + anchors[:, 2:]) / 2
    return torch.cat([c - deltas[:, :2] * s, c + deltas[:, 2:] * s], dim=1)


def independent_cls_loss(kind, logits, labels, pred_boxes, gt_boxes, num_classes):
    """VFL / QFL per element from targets = torchvision's IoU at the positives' class."""
    valid = labels >= 0
    pos = valid & (labels < num_classes)
    q = torch.zeros_like(logits)
    q[pos, labels[pos]] = box_iou(pred_boxes[pos], gt_boxes[pos]).diagonal()
    p = logits.sigmoid()
    bce = -(q * p.log() + (1 - q) * (1 - p).log())
    if kind == "varifocal":
        w = torch.where(q > 0, q, 0.75 * p**2)
    else:
        w = (q - p).abs() ** 2
    return (bce * w)[valid].sum(), int(pos.sum())


@pytest.mark.parametrize("kind", ["varifocal", "quality_focal"])
def test_retinanet_cls_loss_is_the_independent_computation_and_only_it_changes(kind):
    torch.manual_seed(0)
    model = build_model(retinanet_cfg(kind))
    assert type(model) is IoUAwareRetinaNet and model.cls_loss_type == kind
    anchors, (logits, deltas) = dense_inputs(model, [(3, 2.0), (4, 0.3)])
    gt = gt_instances()
    labels, boxes = model.label_anchors(anchors, gt)
    assert labels[0].numel() == 9 * sum(math.ceil(800 / s) * math.ceil(1333 / s) for s in (8, 16, 32, 64, 128))
    with EventStorage():
        losses = model.losses(anchors, logits, labels, deltas, boxes)
    all_anchors = Boxes.cat(anchors).tensor
    pred_boxes = decode_retinanet(torch.cat(deltas, 1)[0].double(), all_anchors.double())
    want, num_pos = independent_cls_loss(
        kind, torch.cat(logits, 1)[0].double(), labels[0], pred_boxes, boxes[0].double(), 3
    )
    assert num_pos > 20 and int((labels[0] == -1).sum()) > 0  # positives and ignored anchors
    normalizer = 100 * 0.9 + num_pos * 0.1  # Detectron2's EMA after one step, from 100
    assert float(losses["loss_cls"]) == pytest.approx(float(want) / normalizer, rel=1e-5)

    # Detectron2's RetinaNet of the same config: the same box loss, its own focal loss.
    base = RetinaNet(**RetinaNet.from_config(retinanet_cfg(kind)))
    with EventStorage():
        fl = base.losses(anchors, logits, labels, deltas, boxes)
    assert torch.equal(losses["loss_box_reg"], fl["loss_box_reg"])
    # (VFL's negatives are weighted as FL's: only the positives' terms differ.)
    assert float(losses["loss_cls"]) != pytest.approx(float(fl["loss_cls"]), rel=1e-6)


def test_retinanet_focal_setting_is_detectron2s_retinanet():
    cfg = retinanet_cfg("focal")
    torch.manual_seed(0)
    model = build_model(cfg)
    torch.manual_seed(0)
    base = RetinaNet(**RetinaNet.from_config(cfg))
    images = ImageList(torch.rand(1, 3, 256, 320) * 255, [(256, 320)])
    gt = gt_instances((256, 320))
    gt[0].gt_boxes.tensor.clamp_(max=300)
    batch = [{"image": images.tensor[0], "instances": gt[0]}]
    with EventStorage():
        model.train(), base.train()
        got, want = model(batch), base(batch)
    assert got.keys() == want.keys() == {"loss_cls", "loss_box_reg"}
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_clip_boxes_before_nms_clips_and_drops_the_empty_candidates():
    model = build_model(retinanet_cfg("focal", "MODEL.RETINANET.CLIP_BOXES_BEFORE_NMS", "True"))
    anchors = Boxes(torch.tensor([[-50.0, 10, 30, 40], [200, 10, 260, 40], [10, 10, 50, 60]]))
    scores = torch.tensor([[0.9, 0.0], [0.8, 0.0], [0.0, 0.7]])  # (anchors, K = 2)
    deltas = torch.zeros(3, 4)  # the boxes are the anchors
    pred = model._decode_per_level_predictions(anchors, scores, deltas, 0.05, 1000, (100, 150))
    # The first box clipped at x = 0; the second lies right of the image (x1 = 200 > 150): empty.
    assert pred.pred_boxes.tensor.tolist() == [[0.0, 10, 30, 40], [10, 10, 50, 60]]
    assert pred.scores.tolist() == pytest.approx([0.9, 0.7]) and pred.pred_classes.tolist() == [0, 1]
    model.clip_boxes_before_nms = False  # Detectron2's: unclipped until detector_postprocess
    pred = model._decode_per_level_predictions(anchors, scores, deltas, 0.05, 1000, (100, 150))
    assert pred.pred_boxes.tensor.tolist() == anchors.tensor[[0, 1, 2]].tolist()


def fcos_model(kind):
    cfg = LazyConfig.load(os.path.join(ROOT, "configs", "lazy", "fcos_vfl_shapes_demo.py"))
    cfg.model.cls_loss_type = kind
    return instantiate(cfg.model)


@pytest.mark.parametrize("kind", ["varifocal", "quality_focal"])
def test_fcos_cls_loss_is_the_independent_computation_and_only_it_changes(kind):
    torch.manual_seed(0)
    model = fcos_model(kind)
    assert type(model) is IoUAwareFCOS
    anchors, (logits, deltas, ctr) = dense_inputs(model, [(4, 2.0), (4, 0.5), (1, 1.0)])
    deltas = [d.abs() + 0.5 for d in deltas]  # FCOS's distances are positive
    gt = gt_instances()
    gt[0].gt_classes = torch.tensor([0, 3, 1])
    labels, boxes = model.label_anchors(anchors, gt)
    with EventStorage():
        losses = model.losses(anchors, logits, labels, deltas, boxes, ctr)
    pred_boxes = decode_fcos(torch.cat(deltas, 1)[0].double(), Boxes.cat(anchors).tensor.double())
    want, num_pos = independent_cls_loss(
        kind, torch.cat(logits, 1)[0].double(), labels[0], pred_boxes, boxes[0].double(), 4
    )
    assert num_pos > 20
    normalizer = 300 * 0.9 + num_pos * 0.1  # Detectron2 FCOS's EMA after one step, from 300
    assert float(losses["loss_fcos_cls"]) == pytest.approx(float(want) / normalizer, rel=1e-5)

    # Detectron2's FCOS of fcos_shapes_demo.py: the same box and centerness losses.
    base = instantiate(LazyConfig.load(os.path.join(ROOT, "configs", "lazy", "fcos_shapes_demo.py")).model)
    assert type(base) is FCOS
    with EventStorage():
        fl = base.losses(anchors, logits, labels, deltas, boxes, ctr)
    assert torch.equal(losses["loss_fcos_loc"], fl["loss_fcos_loc"])
    assert torch.equal(losses["loss_fcos_ctr"], fl["loss_fcos_ctr"])  # centerness kept, as FCOS's
    assert float(losses["loss_fcos_cls"]) != pytest.approx(float(fl["loss_fcos_cls"]), rel=1e-6)


def test_retinanet_vfl_yaml_and_lazy_configs_build_the_same_model_and_optimizer():
    from vfnet.solver import build_optimizer

    ycfg = get_cfg()
    vfnet.add_vfnet_config(ycfg)
    ycfg.merge_from_file(os.path.join(ROOT, "configs", "RetinaNet_VFL_R_50_FPN_1x.yaml"))
    ycfg.MODEL.DEVICE = "cpu"
    lcfg = LazyConfig.load(os.path.join(ROOT, "configs", "lazy", "retinanet_vfl_R_50_FPN_1x.py"))
    torch.manual_seed(0)
    ymodel = build_model(ycfg)
    torch.manual_seed(0)
    lmodel = instantiate(lcfg.model)
    assert type(lmodel) is type(ymodel) is IoUAwareRetinaNet
    ystate, lstate = ymodel.state_dict(), lmodel.state_dict()
    assert [(k, v.shape) for k, v in lstate.items()] == [(k, v.shape) for k, v in ystate.items()]
    assert all(torch.equal(lstate[k], ystate[k]) for k in ystate)  # same initialisation
    for attr in ("cls_loss_type", "vfl_alpha", "vfl_gamma", "vfl_iou_weighted", "qfl_beta",
                 "smooth_l1_beta", "box_reg_loss_type", "focal_loss_alpha", "num_classes",
                 "test_score_thresh", "test_topk_candidates", "test_nms_thresh",
                 "max_detections_per_image", "clip_boxes_before_nms"):  # fmt: skip
        assert getattr(lmodel, attr) == getattr(ymodel, attr), attr
    assert lmodel.box2box_transform.weights == ymodel.box2box_transform.weights == (1.0, 1.0, 1.0, 1.0)
    assert lmodel.smooth_l1_beta == 0.0 and lmodel.cls_loss_type == "varifocal"
    for a, b in zip(lmodel.anchor_generator.cell_anchors, ymodel.anchor_generator.cell_anchors):
        assert torch.equal(a, b)
    # One optimizer group: lr 0.01 and weight decay 1e-4 on every parameter (no paramwise_cfg).
    lcfg.optimizer.params.model = lmodel
    lopt, yopt = instantiate(lcfg.optimizer), build_optimizer(ycfg, ymodel)
    for opt in (lopt, yopt):
        assert {(g["lr"], g["weight_decay"]) for g in opt.param_groups} == {(0.01, 1e-4)}
        trainable = [p for p in lmodel.parameters() if p.requires_grad]  # res2 and the stem frozen
        assert sum(len(g["params"]) for g in opt.param_groups) == len(trainable)


def test_an_unknown_loss_type_names_the_key():
    with pytest.raises(ValueError, match=r"MODEL.RETINANET.CLS_LOSS_TYPE.*'focal', 'varifocal'"):
        build_model(retinanet_cfg("varifocl"))


# ---------------------------------------------------------------------------------------------
# VFNet's own switch (MODEL.VFNET.CLS_LOSS_TYPE), at 800 x 1333
# ---------------------------------------------------------------------------------------------


def vfnet_losses(kind, monkeypatch):
    """
    VFNet R-18 (3 classes, the same weights for every `kind`) on an 800 x 1333 image with
    gt_instances(): its losses, and the logits and targets its IoU-aware loss was given (VFL's
    or QFL's, captured; None for the focal loss).
    """
    from vfnet.modeling.meta_arch import vfnet as vfnet_module

    from helpers import small_cfg

    seen = {}

    def spy(fn):
        def wrapper(logits, targets, *args, **kwargs):
            seen.update(logits=logits.detach().double(), targets=targets.detach().double())
            return fn(logits, targets, *args, **kwargs)

        return wrapper

    for name in ("varifocal_loss", "quality_focal_loss"):
        monkeypatch.setattr(vfnet_module, name, spy(getattr(vfnet_module, name)))
    torch.manual_seed(0)
    model = build_model(small_cfg("MODEL.VFNET.CLS_LOSS_TYPE", kind))
    assert model.cls_loss_type == kind
    torch.manual_seed(1)
    image = torch.rand(3, 800, 1333) * 255
    with EventStorage():
        losses = model([{"image": image, "instances": gt_instances()[0]}])
    return losses, seen.get("logits"), seen.get("targets")


def test_vfnet_cls_loss_switch_is_the_independent_computation_on_the_same_targets(monkeypatch):
    vfl, logits, q = vfnet_losses("varifocal", monkeypatch)
    # The IoU-aware targets: one class per positive location, its IoU in (0, 1].
    positive = (q > 0).any(dim=-1)
    num_pos = int(positive.sum())
    assert num_pos > 20 and bool(((q > 0).sum(-1) <= 1).all()) and float(q.max()) <= 1.0
    p = logits.sigmoid()
    bce = -(q * p.log() + (1 - q) * (1 - p).log())

    qfl, qfl_logits, qfl_q = vfnet_losses("quality_focal", monkeypatch)
    assert torch.equal(qfl_logits, logits) and torch.equal(qfl_q, q)  # same model, same targets
    want = (bce * (q - p).abs() ** 2).sum() / num_pos
    assert float(qfl["loss_cls"]) == pytest.approx(float(want), rel=1e-5)
    want = (bce * torch.where(q > 0, q, 0.75 * p**2)).sum() / num_pos
    assert float(vfl["loss_cls"]) == pytest.approx(float(want), rel=1e-5)

    fl, _, _ = vfnet_losses("focal", monkeypatch)
    # The focal loss on the one-hot ATSS labels: 1 at the positives' class.
    t = (q > 0).double()
    p_t = torch.where(t > 0, p, 1 - p)
    alpha_t = torch.where(t > 0, 0.25, 0.75)
    want = (-alpha_t * (1 - p_t) ** 2 * p_t.log()).sum() / num_pos
    assert float(fl["loss_cls"]) == pytest.approx(float(want), rel=1e-5)
    # Only the classification loss changes.
    for other in (qfl, fl):
        for key in ("loss_bbox", "loss_bbox_refine"):
            assert torch.equal(other[key], vfl[key]), key


def test_vfnet_unknown_loss_type_names_the_key():
    from helpers import small_cfg

    with pytest.raises(ValueError, match=r"MODEL.VFNET.CLS_LOSS_TYPE.*'focal', 'varifocal'"):
        build_model(small_cfg("MODEL.VFNET.CLS_LOSS_TYPE", "vfl"))


# ---------------------------------------------------------------------------------------------
# tools/train_net.py and tools/lazyconfig_train_net.py
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return dataset_specs(tiny_shapes(tmp_path_factory.mktemp("vfl_tiny"), 6, 4), "vfl")


def run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert re.search(r"copypaste: AP,AP50,AP75,APs,APm,APl", log), log[-3000:]
    return log


@pytest.mark.parametrize("config", ["RetinaNet_VFL_Shapes_Demo.yaml", "RetinaNet_QFL_Shapes_Demo.yaml"])
def test_train_net_trains_and_evaluates_retinanet_with_iou_aware_losses(config, tiny, tmp_path):
    log = run([
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", config),
        "--dataset", tiny["train"], "--dataset", tiny["val"],
        "DATASETS.TRAIN", "('vfl_train',)", "DATASETS.TEST", "('vfl_val',)",
        "MODEL.RESNETS.DEPTH", "18", "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "2",
        "SOLVER.MAX_ITER", "2", "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "(1,)",
        "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "64",
        "INPUT.MAX_SIZE_TEST", "96", "TEST.GALLERY.NUM_IMAGES", "0", "OUTPUT_DIR", str(tmp_path),
    ])  # fmt: skip
    assert "IoUAwareRetinaNet" in log and "loss_cls" in log


@pytest.mark.parametrize("config", ["fcos_vfl_shapes_demo.py", "fcos_qfl_shapes_demo.py"])
def test_lazyconfig_train_net_trains_and_evaluates_fcos_with_iou_aware_losses(config, tiny, tmp_path):
    run([
        sys.executable, os.path.join(ROOT, "tools", "lazyconfig_train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "lazy", config),
        "--dataset", tiny["train"], "--dataset", tiny["val"], f"train.output_dir={tmp_path}",
        "dataloader.train.dataset.names=vfl_train", "dataloader.test.dataset.names=vfl_val",
        "dataloader.train.total_batch_size=2", "dataloader.train.num_workers=0",
        "dataloader.test.num_workers=0", "train.max_iter=2", "train.seed=7",
        "model.test_score_thresh=0.01", "train.gallery.num_images=0",
    ])  # fmt: skip
    saved = LazyConfig.load(str(tmp_path / "config.yaml"))
    assert saved.model._target_.endswith("IoUAwareFCOS")
    assert saved.model.cls_loss_type == ("varifocal" if "vfl" in config else "quality_focal")


# ---------------------------------------------------------------------------------------------
# The RetinaNet converter (vfnet/checkpoint/retinanet_converter.py), without MMDetection
# ---------------------------------------------------------------------------------------------


def mmdet_anchor_index(d2_index, num_sizes=3, num_ratios=3):
    """Detectron2 numbers a location's anchors size * R + ratio, MMDetection ratio * S + size."""
    size, ratio = divmod(d2_index, num_ratios)
    return ratio * num_sizes + size


def test_anchor_permutation_maps_detectron2s_cell_anchors_to_mmdets():
    from detectron2.modeling.anchor_generator import DefaultAnchorGenerator

    from vfnet.checkpoint.retinanet_converter import anchor_permutation

    sizes, ratios = [32 * 2 ** (i / 3) for i in range(3)], [0.5, 1.0, 2.0]
    d2 = DefaultAnchorGenerator(sizes=[sizes], aspect_ratios=[ratios], strides=[8]).cell_anchors
    d2 = next(iter(d2))
    # MMDetection's AnchorGenerator(octave_base_scale=4, scales_per_octave=3, strides=[8]), its
    # base anchors written out: for each ratio (h / w), for each scale, w = 8 * scale / sqrt(r).
    mm = []
    for r in ratios:
        for i in range(3):
            w, h = 8 * 4 * 2 ** (i / 3) / math.sqrt(r), 8 * 4 * 2 ** (i / 3) * math.sqrt(r)
            mm.append([-w / 2, -h / 2, w / 2, h / 2])
    mm = torch.tensor(mm)
    perm = anchor_permutation(3, 3)
    assert perm.tolist() == [mmdet_anchor_index(a) for a in range(9)] == [0, 3, 6, 1, 4, 7, 2, 5, 8]
    torch.testing.assert_close(d2, mm[perm], rtol=1e-5, atol=1e-4)


def mmdet_name(key):
    """The MMDetection name of a Detectron2 RetinaNet parameter, by MMDetection's conventions."""
    import re

    rules = [
        (r"backbone\.bottom_up\.stem\.conv1\.weight", "backbone.conv1.weight"),
        (r"backbone\.bottom_up\.stem\.conv1\.norm\.(\w+)", r"backbone.bn1.\1"),
        (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.weight", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.conv{m[3]}.weight"),
        (r"backbone\.bottom_up\.res(\d)\.(\d+)\.conv(\d)\.norm\.(\w+)", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.bn{m[3]}.{m[4]}"),
        (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.weight", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.0.weight"),
        (r"backbone\.bottom_up\.res(\d)\.(\d+)\.shortcut\.norm\.(\w+)", lambda m: f"backbone.layer{int(m[1]) - 1}.{m[2]}.downsample.1.{m[3]}"),
        (r"backbone\.fpn_lateral(\d)\.(\w+)", lambda m: f"neck.lateral_convs.{int(m[1]) - 3}.conv.{m[2]}"),
        (r"backbone\.fpn_output(\d)\.(\w+)", lambda m: f"neck.fpn_convs.{int(m[1]) - 3}.conv.{m[2]}"),
        (r"backbone\.top_block\.p6\.(\w+)", r"neck.fpn_convs.3.conv.\1"),
        (r"backbone\.top_block\.p7\.(\w+)", r"neck.fpn_convs.4.conv.\1"),
        (r"head\.cls_subnet\.(\d+)\.(\w+)", lambda m: f"bbox_head.cls_convs.{int(m[1]) // 2}.conv.{m[2]}"),
        (r"head\.bbox_subnet\.(\d+)\.(\w+)", lambda m: f"bbox_head.reg_convs.{int(m[1]) // 2}.conv.{m[2]}"),
        (r"head\.cls_score\.(\w+)", r"bbox_head.retina_cls.\1"),
        (r"head\.bbox_pred\.(\w+)", r"bbox_head.retina_reg.\1"),
    ]  # fmt: skip
    for pattern, repl in rules:
        if re.fullmatch(pattern, key):
            return re.sub(pattern, repl, key)
    raise AssertionError(f"no MMDetection name for {key}")


R18 = ["MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
       "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.RETINANET.NUM_CLASSES", "5"]  # fmt: skip


def test_convert_tool_round_trip_with_mmdets_names_and_anchor_order(tmp_path):
    """A Detectron2 RetinaNet's weights, written as an MMDetection checkpoint (its names, its
    anchor order, BN counters), come back equal through tools/convert_mmdet_to_d2.py."""
    config = os.path.join(ROOT, "configs", "mmdet", "RetinaNet_VFL_R_50_FPN_1x.yaml")
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *R18])
    torch.manual_seed(0)
    model = build_model(cfg)
    assert type(model.backbone.top_block).__name__ == "LastLevelP6P7WithoutReLU"
    d2 = {k: v + torch.rand_like(v) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    mm = {}
    for key, value in d2.items():
        if key.startswith(("head.cls_score", "head.bbox_pred")):  # channels a * per + c
            per = 5 if "cls_score" in key else 4
            value_mm = torch.empty_like(value)
            for a in range(9):
                value_mm[mmdet_anchor_index(a) * per : (mmdet_anchor_index(a) + 1) * per] = value[a * per : (a + 1) * per]
            value = value_mm
        mm[mmdet_name(key)] = value
        if key.endswith("norm.running_var"):
            mm[mmdet_name(key).replace("running_var", "num_batches_tracked")] = torch.tensor(7)
    src, dst = tmp_path / "mmdet.pth", tmp_path / "d2.pth"
    torch.save({"meta": {"mmdet_version": "2.10.0"}, "state_dict": mm}, src)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tools", "convert_mmdet_to_d2.py"), "--arch", "retinanet",
         str(src), str(dst), "--config-file", config, *R18],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "every key and shape matches" in proc.stdout
    out = torch.load(dst, weights_only=True)
    assert out["__author__"] == "mmdetection" and out["matching_heuristics"] is False
    assert out["model"].keys() == d2.keys()
    for k in d2:
        assert torch.equal(out["model"][k], d2[k]), k


def test_converter_refuses_other_checkpoints_by_name():
    from vfnet.checkpoint.converter import ConversionError
    from vfnet.checkpoint.retinanet_converter import convert_retinanet_mmdet_to_d2

    head = {"bbox_head.retina_cls.weight": torch.zeros(9 * 3, 8, 3, 3),
            "bbox_head.retina_reg.weight": torch.zeros(36, 8, 3, 3)}  # fmt: skip
    with pytest.raises(ConversionError, match=r"convert it without --arch retinanet"):
        convert_retinanet_mmdet_to_d2({"bbox_head.vfnet_cls.weight": torch.zeros(3, 8, 3, 3)})
    with pytest.raises(ConversionError, match=r"'bbox_head\.atss_centerness\.weight'"):
        convert_retinanet_mmdet_to_d2({**head, "bbox_head.atss_centerness.weight": torch.zeros(1)})
    with pytest.raises(ConversionError, match=r"36 output channels, expected 4 x 3 sizes x 1 ratios"):
        convert_retinanet_mmdet_to_d2(head, num_sizes=3, num_ratios=1)
