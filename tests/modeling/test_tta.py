"""
Test-time augmentation (vfnet/modeling/test_time_augmentation.py, TEST.AUG.*): against plain
inference, mirrored images, and an independent re-computation of the official merge (the views'
detections before NMS mapped back, concatenated, class-wise NMS, top k); and
tools/train_net.py --eval-only TEST.AUG.ENABLED True end to end.
"""
import copy
import json
import os
import re
import subprocess
import sys
import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("detectron2", reason="Detectron2 is not installed (see README: Install)")

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import transforms as T  # noqa: E402
from detectron2.layers import batched_nms  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from detectron2.structures import Boxes, Instances  # noqa: E402
from fvcore.transforms import HFlipTransform, TransformList  # noqa: E402

import vfnet  # noqa: E402
from vfnet.data.shapes import generate_split  # noqa: E402
from vfnet.data.transforms import with_resize_backend  # noqa: E402
from vfnet.modeling.test_time_augmentation import (  # noqa: E402
    VFNetDatasetMapperTTA,
    VFNetWithTTA,
    tta_scales,
)
from vfnet.modeling.vfnet_head import ModulatedDeformConvBlock  # noqa: E402

from helpers import ROOT, TINY, small_cfg  # noqa: E402

H, W = 80, 120  # the test image


def spread_scores(model):
    """
    Random-init scores are all ~prior_prob and boxes all 8 strides wide: spread the scores over
    (0, 1) (as tests/export/test_export.py) and the boxes over sizes smaller than the image, so that
    more than 100 detections survive the NMS of a small image.
    """
    torch.manual_seed(1)
    torch.nn.init.normal_(model.head.cls_score.weight, std=0.2)
    torch.nn.init.zeros_(model.head.cls_score.bias)
    for layer in (model.head.reg_init, model.head.reg_refine):
        torch.nn.init.normal_(layer.weight, std=0.1)
    torch.nn.init.constant_(model.head.reg_init.bias, -2.0)  # exp(-2) x 8 strides
    for m in model.modules():
        if isinstance(m, ModulatedDeformConvBlock):
            torch.nn.init.normal_(m.conv_offset.weight, std=0.01)
    return model


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return spread_scores(build_model(small_cfg())).eval()


@pytest.fixture(scope="module")
def image():
    """An HWC uint8 image with structure at several scales, not left-right symmetric."""
    rng = np.random.default_rng(0)
    coarse = rng.integers(0, 256, size=(5, 8, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((W, H), Image.BILINEAR), dtype=np.int32)
    noise = rng.integers(-40, 40, size=(H, W, 3))
    return np.clip(smooth + noise, 0, 255).astype(np.uint8)


def chw(image):
    return torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))


def tta_cfg(min_sizes, max_sizes=(), flip=True, *opts):
    return small_cfg(
        "TEST.AUG.ENABLED", "True",
        "TEST.AUG.MIN_SIZES", str(tuple(min_sizes)),
        "TEST.AUG.MAX_SIZES", str(tuple(max_sizes)),
        "TEST.AUG.FLIP", str(flip),
        *opts,
    )  # fmt: skip


def tta_detections(model, cfg, image):
    with torch.no_grad():
        return VFNetWithTTA(cfg, model)([{"image": chw(image)}])[0]["instances"]


def as_arrays(inst):
    return inst.pred_boxes.tensor.numpy(), inst.scores.numpy(), inst.pred_classes.numpy()


@pytest.mark.parametrize("backend", ["PIL", "cv2"])
def test_one_scale_without_flip_is_plain_inference(model, image, backend):
    # The test size of plain inference: 64 x 128 (the image 80 x 120 -> 64 x 96).
    cfg = tta_cfg((64,), (128,), False, "INPUT.RESIZE_BACKEND", backend)
    resize = with_resize_backend([T.ResizeShortestEdge(64, 128)], backend)[0]
    resized = resize.get_transform(image).apply_image(image)
    assert resized.shape[:2] == (64, 96)
    with torch.no_grad():
        plain = model([{"image": chw(resized), "height": H, "width": W}])[0]["instances"]
    tta = tta_detections(model, cfg, image)
    assert tta.image_size == plain.image_size == (H, W)
    assert len(plain) == model.max_detections_per_image  # NMS and the top k both matter
    assert torch.equal(tta.pred_classes, plain.pred_classes)
    assert torch.equal(tta.scores, plain.scores)
    assert torch.equal(tta.pred_boxes.tensor, plain.pred_boxes.tensor)


def test_flip_tta_of_the_mirrored_image_gives_the_mirrored_detections(model, image):
    # One scale at the image's own size (no resize), plus the flip: the views of the mirrored
    # image are those of the image, flipped, so the detections are mirrored.
    cfg = tta_cfg((H,), (1000,), True)
    assert len(VFNetDatasetMapperTTA.from_config(cfg)) == 2
    boxes, scores, classes = as_arrays(tta_detections(model, cfg, image))
    m_boxes, m_scores, m_classes = as_arrays(tta_detections(model, cfg, image[:, ::-1].copy()))
    assert len(scores) == len(m_scores) > 20
    order, m_order = np.argsort(-scores, kind="stable"), np.argsort(-m_scores, kind="stable")
    np.testing.assert_array_equal(scores[order], m_scores[m_order])
    np.testing.assert_array_equal(classes[order], m_classes[m_order])
    mirrored = np.stack([W - boxes[:, 2], boxes[:, 1], W - boxes[:, 0], boxes[:, 3]], axis=1)
    np.testing.assert_allclose(mirrored[order], m_boxes[m_order], rtol=0, atol=1e-4)
    # The flipped view contributes: the detections differ from those of the unflipped view.
    plain = as_arrays(tta_detections(model, tta_cfg((H,), (1000,), False), image))
    assert not (len(plain[1]) == len(scores) and np.array_equal(plain[1], scores))


def test_merge_equals_an_independent_recomputation(model, image):
    # Two scales in MMDetection's (long, short) form (128, 64) and (144, 112): the second one's
    # short side 112 (x1.4 -> 112 x 168) is cut by its own long-side limit, 144 (x1.2).
    cfg = tta_cfg((64, 112), (128, 144), True)
    assert tta_scales(cfg) == [(64, 128), (112, 144)]
    views = VFNetDatasetMapperTTA.from_config(cfg)({"image": chw(image), "height": H, "width": W})
    sizes = [(64, 96), (96, 144)]
    assert [tuple(v["image"].shape[1:]) for v in views] == [s for s in sizes for _ in (0, 1)]

    # By hand: each view resized with PIL and flipped with numpy; its detections before NMS from
    # the model itself, with an NMS that keeps everything and no top k.
    everything = copy.deepcopy(model)
    everything.test_nms_thresh, everything.max_detections_per_image = 1.0, 10**9
    all_boxes, all_scores, all_classes = [], [], []
    for h, w in sizes:
        resized = np.asarray(Image.fromarray(image).resize((w, h), Image.BILINEAR))
        for flip in (False, True):
            view = resized[:, ::-1] if flip else resized
            with torch.no_grad():
                inst = everything([{"image": chw(view), "height": h, "width": w}])[0]["instances"]
            b = inst.pred_boxes.tensor.clone()
            if flip:  # x -> w - x
                b = torch.stack([w - b[:, 2], b[:, 1], w - b[:, 0], b[:, 3]], dim=1)
            b = b * torch.tensor([W / w, H / h, W / w, H / h])
            all_boxes.append(b)
            all_scores.append(inst.scores)
            all_classes.append(inst.pred_classes)
    boxes, scores, classes = torch.cat(all_boxes), torch.cat(all_scores), torch.cat(all_classes)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, W)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, H)
    keep = batched_nms(boxes, scores, classes, 0.6)[:100]
    expected = boxes[keep], scores[keep], classes[keep]
    assert len(scores) > 4 * 100 and len(keep) == 100

    tta = tta_detections(model, cfg, image)
    assert tta.image_size == (H, W)
    assert torch.equal(tta.pred_classes, expected[2])
    torch.testing.assert_close(tta.scores, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(tta.pred_boxes.tensor, expected[0], rtol=0, atol=1e-4)
    # Each of the 4 views contributes to the detections (TTA is not one view's detections).
    per_view = [len(x) for x in all_scores]
    owners = np.searchsorted(np.cumsum(per_view), keep.numpy(), side="right")
    assert set(owners.tolist()) == {0, 1, 2, 3}


def test_merge_takes_the_views_detections_before_nms(model):
    # The official dense-head merge (get_bboxes(..., with_nms=False) per view, one
    # multiclass_nms): a box that its own view's NMS would drop (b, under a) survives when the
    # box that drops it (a) is itself dropped by another view's (c) and b hardly overlaps c.
    # View 1 (unflipped): a [10, 0, 20, 10] 0.9, b [8, 0, 18, 10] 0.8 (IoU(a, b) = 0.67);
    # view 2, flipped in a 30 px wide image: c [12, 0, 22, 10] 0.95 (IoU(a, c) = 0.67,
    # IoU(b, c) = 0.43), i.e. [8, 0, 18, 10] in the flipped view.
    def view(boxes, scores):
        return Instances(
            (10, 30),
            pred_boxes=Boxes(torch.tensor(boxes, dtype=torch.float32)),
            scores=torch.tensor(scores),
            pred_classes=torch.zeros(len(scores), dtype=torch.int64),
        )

    views = [view([[10, 0, 20, 10], [8, 0, 18, 10]], [0.9, 0.8]), view([[8, 0, 18, 10]], [0.95])]
    tfms = [TransformList([]), TransformList([HFlipTransform(30)])]
    merged = VFNetWithTTA(tta_cfg((64,)), model).merge(views, tfms, (10, 30))
    assert merged.pred_boxes.tensor.tolist() == [[12, 0, 22, 10], [8, 0, 18, 10]]
    assert merged.scores.tolist() == pytest.approx([0.95, 0.8])


def test_max_sizes_must_match_min_sizes():
    with pytest.raises(ValueError, match="one entry per TEST.AUG.MIN_SIZES"):
        tta_scales(tta_cfg((64, 80), (128,)))
    cfg = tta_cfg((64, 80), (), True, "TEST.AUG.MAX_SIZE", "500")
    assert tta_scales(cfg) == [(64, 500), (80, 500)]


def test_official_tta_config():
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_R_50_FPN_1x_TTA.yaml"))
    assert cfg.TEST.AUG.ENABLED and cfg.TEST.AUG.FLIP
    # MMDetection's (long, short): (1200, 800), (1300, 900), (1500, 1000), (1600, 1200).
    assert tta_scales(cfg) == [(800, 1200), (900, 1300), (1000, 1500), (1200, 1600)]
    assert cfg.MODEL.VFNET.TEST_NMS_THRESH == 0.6
    assert cfg.MODEL.VFNET.TEST_DETECTIONS_PER_IMAGE == 100


def test_train_net_eval_only_with_tta(tmp_path):
    root = tmp_path / "tiny"
    generate_split(str(root), "val", 3, seed=3, image_size=(64, 96))
    opts = TINY + ["DATASETS.TRAIN", "('tiny_val',)", "DATASETS.TEST", "('tiny_val',)"]
    cfg = get_cfg()
    vfnet.add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"))
    cfg.merge_from_list(opts)
    torch.manual_seed(0)
    DetectionCheckpointer(spread_scores(build_model(cfg)), save_dir=str(tmp_path)).save("weights")
    out = tmp_path / "out"
    cmd = [
        sys.executable, os.path.join(ROOT, "tools", "train_net.py"),
        "--config-file", os.path.join(ROOT, "configs", "VFNet_Shapes_Demo.yaml"),
        "--dataset", f"tiny_val={root / 'val.json'}:{root / 'val'}",
        "--eval-only", *opts, "MODEL.WEIGHTS", str(tmp_path / "weights.pth"),
        "TEST.AUG.ENABLED", "True", "TEST.AUG.MIN_SIZES", "(64, 80)",
        "TEST.AUG.MAX_SIZES", "(96, 120)", "OUTPUT_DIR", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "Running inference with test-time augmentation" in log
    # Two COCO evaluations: the plain one, then the TTA one (its AP printed last).
    aps = re.findall(r"copypaste: ([-0-9.,nan]+)$", log, flags=re.M)
    assert len(aps) == 2, log[-3000:]
    tta_ap = [float(x) for x in aps[1].split(",")]
    # AP, AP50, AP75, APs, APm, APl (NaN for sizes the tiny images have no object of)
    assert len(tta_ap) == 6 and all(0 <= x <= 100 for x in tta_ap if x == x), aps[1]
    assert "Evaluation results for bbox" in log.split("test-time augmentation")[1]
    results = {}
    for folder in ("inference", "inference_TTA"):
        with open(out / folder / "coco_instances_results.json") as f:
            results[folder] = json.load(f)
    tta = results["inference_TTA"]
    assert tta and tta != results["inference"]
    # Boxes [x, y, w, h] in the original images' coordinates.
    with open(root / "val.json") as f:
        sizes = {im["id"]: (im["width"], im["height"]) for im in json.load(f)["images"]}
    for r in tta:
        (x, y, w, h), (width, height) = r["bbox"], sizes[r["image_id"]]
        assert x >= 0 and y >= 0 and x + w <= width + 1e-3 and y + h <= height + 1e-3
