"""
Parity of converted RetinaNet checkpoints (vfnet/checkpoint/retinanet_converter.py) with
MMDetection 3.3's RetinaNet, for tests/parity/test_mmdet_parity_retinanet.py: MMDetection's RetinaNet
of its configs/retinanet/retinanet_r50_fpn_1x_coco.py (the official RetinaNet + FL / + VFL
architecture) with every tensor perturbed (`mmdet_parity.perturb_`), converted, loaded into
Detectron2's RetinaNet of configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml, and compared: anchors,
features, per-level head outputs, detections. Imports MMDetection, mmengine, mmcv, Detectron2.
"""
import contextlib
import os
import tempfile
from typing import Optional, Tuple

import torch

from vfnet.checkpoint.retinanet_converter import convert_retinanet_checkpoint_file

from .mmdet_parity import (
    DEFAULT_IMAGE,
    REPO,
    Report,
    compare_detections,
    d2_cfg,
    install_mmcv_ops_standins,
    perturb_and_record,
    record_loading,
    read_rgb,
    training_batch,
)

MMDET_CONFIG = os.path.join("retinanet", "retinanet_r50_fpn_1x_coco.py")
D2_CONFIG = "configs/mmdet/RetinaNet_VFL_R_50_FPN_1x.yaml"


def build_mmdet_retinanet(num_classes: int):
    install_mmcv_ops_standins()
    import mmdet
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules
    from mmengine.config import Config

    register_all_modules()
    cfg = Config.fromfile(
        os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", MMDET_CONFIG)
    )
    cfg.model.backbone.init_cfg = None  # no download: every tensor is set by perturb_()
    cfg.model.bbox_head.num_classes = num_classes
    return MODELS.build(cfg.model).float().eval()


def convert_and_load(mm_model, num_classes: int, workdir: str):
    """Save, convert as tools/convert_mmdet_to_d2.py --arch retinanet, build and load."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    src, dst = os.path.join(workdir, "mmdet_retinanet.pth"), os.path.join(workdir, "d2.pth")
    torch.save({"meta": {"mmdet_version": "3.3.0"}, "state_dict": mm_model.state_dict()}, src)
    print(
        convert_retinanet_checkpoint_file(
            src,
            dst,
            os.path.join(REPO, D2_CONFIG),
            ["MODEL.RETINANET.NUM_CLASSES", str(num_classes)],
        )
    )
    model = build_model(d2_cfg(D2_CONFIG, num_classes, head="RETINANET")).eval()
    incompatible = DetectionCheckpointer(model)._load_model(torch.load(dst, weights_only=True))
    return model, incompatible, torch.load(dst, weights_only=True)["model"]


def mmdet_anchor_order(d2_cell: torch.Tensor, mm_base: torch.Tensor) -> torch.Tensor:
    """(A,) for each Detectron2 cell anchor the index of the equal MMDetection base anchor."""
    return (d2_cell[:, None] - mm_base[None]).abs().amax(dim=2).argmin(dim=1)


@torch.no_grad()
def run_retinanet_parity(
    num_classes: int = 3, seed: int = 0, image_path: Optional[str] = DEFAULT_IMAGE,
    det_scale: Tuple[int, int] = (448, 256),
) -> Report:
    report = Report()
    report.facts["mmcv kernels"] = install_mmcv_ops_standins()
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(tempfile.TemporaryDirectory())
        mm = build_mmdet_retinanet(num_classes)
        perturb_and_record(mm, seed, report)
        model, incompatible, converted = convert_and_load(mm, num_classes, workdir)
    record_loading(model, incompatible, converted, report, shapes=False)

    # ------------------------------------------------ anchors, features and head outputs
    x = model.preprocess_image(training_batch(image_path, num_classes=num_classes)).tensor
    d2_feats = model.backbone(x)
    mm_feats = mm.extract_feat(x)
    for i, f in enumerate(model.head_in_features):
        report.add("features", f, d2_feats[f], mm_feats[i])
    d2_feats = [d2_feats[f] for f in model.head_in_features]
    logits, deltas = model.head(d2_feats)
    mm_cls, mm_reg = mm.bbox_head(mm_feats)
    orders = []
    for i, (d2_cell, mm_base) in enumerate(
        zip(model.anchor_generator.cell_anchors, mm.bbox_head.prior_generator.base_anchors)
    ):
        order = mmdet_anchor_order(d2_cell, mm_base)
        report.add("anchors", f"cell anchors p{i + 3}", d2_cell, mm_base[order])
        orders.append(order)
    report.facts["anchor orders (mmdet index of each d2 anchor)"] = [o.tolist() for o in orders]
    for i, order in enumerate(orders):
        n, _, h, w = mm_cls[i].shape
        a = len(order)
        mm_logits = mm_cls[i].reshape(n, a, -1, h, w)[:, order].reshape(n, -1, h, w)
        mm_deltas = mm_reg[i].reshape(n, a, 4, h, w)[:, order].reshape(n, -1, h, w)
        report.add("head", f"logits p{i + 3}", logits[i], mm_logits)
        report.add("head", f"deltas p{i + 3}", deltas[i], mm_deltas)
    report.objects.update(
        d2_model=model, mm_model=mm, d2_features=d2_feats, mm_head=(mm_cls, mm_reg)
    )

    # ------------------------------------------------ detections on a real image
    # Detectron2's RetinaNet clips in detector_postprocess, MMDetection's at decoding: compare
    # the resized image's boxes clipped.
    images, original_size, mm_orig = compare_detections(
        report, model, mm, read_rgb(image_path), det_scale, clip_resized=True
    )
    report.objects.update(det_images=images, det_original_size=original_size, mm_detections=mm_orig)
    return report
