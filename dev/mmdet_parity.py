"""Parity of converted checkpoints with MMDetection's VarifocalNet, for tools/mmdet_parity.py and
the parity tests; its functions import MMDetection, mmengine, mmcv and Detectron2."""
import contextlib
import importlib.machinery
import importlib.util
import json
import os
import sys
import tempfile
import types
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch

from vfnet.checkpoint.converter import convert_checkpoint_file

from . import REPO

# ../shared/datasets/raccoon beside the checkout
DEFAULT_IMAGE = os.path.join(
    os.path.dirname(REPO), "shared", "datasets", "raccoon", "images", "raccoon-1.jpg"
)
MMDET_MEAN = (123.675, 116.28, 103.53)
MMDET_STD = (58.395, 57.12, 57.375)

# variant -> (MMDetection official config, this project's config for converted weights)
VARIANTS = {
    "r50": ("vfnet_r50_fpn_1x_coco.py", "configs/mmdet/VFNet_R_50_FPN_1x.yaml"),
    "r50_dcn": (
        "vfnet_r50-mdconv-c3-c5_fpn_ms-2x_coco.py",
        "configs/mmdet/VFNet_R_50_DCN_FPN_MS_2x.yaml",
    ),
    "r2_101": ("vfnet_res2net-101_fpn_ms-2x_coco.py", "configs/mmdet/VFNet_R2_101_FPN_MS_2x.yaml"),
    "r2_101_dcn": (
        "vfnet_res2net101-mdconv-c3-c5_fpn_ms-2x_coco.py",
        "configs/mmdet/VFNet_R2_101_DCN_FPN_MS_2x.yaml",
    ),
}


# ----------------------------------------------------------------------------- stand-ins
# mmcv-lite has no compiled ops (mmcv._ext): the stand-in runs torchvision's deform_conv2d (the
# (dy, dx) offset layout of mmcv's kernel) and nms (IoU > thr, offset 0); other ops raise.
STANDIN = "torchvision stand-ins for mmcv's deform conv and NMS"


def _ext_standin() -> types.ModuleType:
    from torchvision.ops import deform_conv2d, nms

    ext = types.ModuleType("mmcv._ext")
    ext.__doc__ = "Stand-in for mmcv's compiled ops (vfnet.checkpoint.mmdet_parity): torchvision's."
    ext.IS_STANDIN = True
    # A spec without a loader: mmengine's mmcv_full_available() (pkgutil.find_loader) reads it
    # as "no compiled mmcv" rather than failing on a module without one.
    ext.__spec__ = importlib.machinery.ModuleSpec("mmcv._ext", None)

    def deform_conv_forward(
        input,
        weight,
        offset,
        output,
        columns,
        ones,
        *,
        kW,
        kH,
        dW,
        dH,
        padW,
        padH,
        dilationW,
        dilationH,
        group,
        deformable_group,
        im2col_step,
    ):
        output.copy_(
            deform_conv2d(
                input,
                offset,
                weight,
                None,
                stride=(dH, dW),
                padding=(padH, padW),
                dilation=(dilationH, dilationW),
            )
        )

    def deform_conv_grads(input, offset, weight, grad_output, kw):
        """Gradients of (input, offset, weight) of torchvision's deform_conv2d (mmcv's backward)."""
        with torch.enable_grad():
            i, o, w = (t.detach().requires_grad_() for t in (input, offset, weight))
            out = deform_conv2d(
                i, o, w, None, stride=(kw["dH"], kw["dW"]), padding=(kw["padH"], kw["padW"]),
                dilation=(kw["dilationH"], kw["dilationW"]),
            )
            return torch.autograd.grad(out, (i, o, w), grad_output)

    def deform_conv_backward_input(
        input, offset, grad_output, grad_input, grad_offset, weight, columns, **kw
    ):
        gi, go, _ = deform_conv_grads(input, offset, weight, grad_output, kw)
        grad_input.copy_(gi)
        grad_offset.copy_(go)

    def deform_conv_backward_parameters(
        input, offset, grad_output, grad_weight, columns, ones, *, scale, **kw
    ):
        # The output is linear in the weight: its gradient does not depend on the weight's value.
        _, _, gw = deform_conv_grads(input, offset, torch.zeros_like(grad_weight), grad_output, kw)
        grad_weight.add_(gw, alpha=scale)

    def modulated_deform_conv_forward(
        input,
        weight,
        bias,
        ones,
        offset,
        mask,
        output,
        columns,
        *,
        kernel_h,
        kernel_w,
        stride_h,
        stride_w,
        pad_h,
        pad_w,
        dilation_h,
        dilation_w,
        group,
        deformable_group,
        with_bias,
    ):
        output.copy_(
            deform_conv2d(
                input,
                offset,
                weight,
                bias if with_bias else None,
                stride=(stride_h, stride_w),
                padding=(pad_h, pad_w),
                dilation=(dilation_h, dilation_w),
                mask=mask,
            )
        )

    def nms_forward(bboxes, scores, *, iou_threshold, offset):
        if offset != 0:
            raise NotImplementedError("the NMS stand-in supports offset=0 only (mmdet's default)")
        return nms(bboxes.float(), scores.float(), iou_threshold)

    ext.deform_conv_forward = deform_conv_forward
    ext.deform_conv_backward_input = deform_conv_backward_input
    ext.deform_conv_backward_parameters = deform_conv_backward_parameters
    ext.modulated_deform_conv_forward = modulated_deform_conv_forward
    ext.nms = nms_forward

    def missing(name):
        if name.startswith("__"):
            raise AttributeError(name)

        def op(*args, **kwargs):
            raise NotImplementedError(
                f"mmcv op '{name}' has no stand-in in vfnet.checkpoint.mmdet_parity"
            )

        return op

    ext.__getattr__ = missing
    return ext


def install_mmcv_ops_standins() -> str:
    """Make ``mmcv.ops`` importable. Returns which kernels mmcv will use."""
    if "mmcv._ext" in sys.modules:
        if getattr(sys.modules["mmcv._ext"], "IS_STANDIN", False):
            return STANDIN
        return "mmcv compiled ops"
    if importlib.util.find_spec("mmcv") is None:
        raise ModuleNotFoundError("mmcv is not installed")
    try:
        import mmcv._ext  # noqa: F401 - the full mmcv with compiled ops

        return "mmcv compiled ops"
    except ImportError:
        sys.modules["mmcv._ext"] = _ext_standin()
        return STANDIN


# ----------------------------------------------------------------------------- models
def mmdet_config(variant: str, num_classes: int):
    import mmdet
    from mmengine.config import Config

    path = os.path.join(
        os.path.dirname(mmdet.__file__), ".mim", "configs", "vfnet", VARIANTS[variant][0]
    )
    cfg = Config.fromfile(path)
    cfg.model.backbone.init_cfg = None  # no download: every tensor is set by perturb_()
    cfg.model.bbox_head.num_classes = num_classes
    return cfg


def build_mmdet_model(variant: str, num_classes: int):
    install_mmcv_ops_standins()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    cfg = mmdet_config(variant, num_classes)
    model = MODELS.build(cfg.model)
    return model.float().eval(), cfg


# The prediction convs of VFNetHead and RetinaHead: smaller weights (plausible boxes), and for the
# classifiers a bias of a low prior (a few hundred scores above the test threshold).
PREDICTION_CONV_STDS = {
    "vfnet_reg": 0.01,
    "vfnet_reg_refine": 0.01,
    "vfnet_cls": 0.02,
    "retina_reg": 0.01,
    "retina_cls": 0.02,
}
CLASSIFIERS = ("vfnet_cls", "retina_cls")


def perturb_and_record(model: torch.nn.Module, seed: int, report: "Report") -> None:
    """:func:`perturb_` `model`, recording in `report` the tensors it left at their default."""
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    perturb_(model, seed)
    unchanged = [k for k, v in model.state_dict().items() if torch.equal(v, fresh[k])]
    report.facts["mmdet tensors left at their default"] = unchanged or "none"


def record_loading(model: torch.nn.Module, incompatible, converted, report: "Report", shapes: bool = True) -> None:
    """Record in `report` what loading `converted` into `model` left out, and what differs."""
    report.facts["load: missing/unexpected" + ("/shape" if shapes else "")] = (
        list(incompatible.missing_keys),
        list(incompatible.unexpected_keys),
    ) + ((list(incompatible.incorrect_shapes),) if shapes else ())
    sd = model.state_dict()
    report.facts["d2 tensors not equal to the converted ones"] = [
        k for k in sd if not torch.equal(sd[k], converted[k])
    ] or "none"


@torch.no_grad()
def perturb_(model: torch.nn.Module, seed: int = 0) -> None:
    """
    Give every parameter and buffer of the MMDetection model a random value away from its
    default: conv weights (He-like, smaller for the prediction convs so that the boxes stay
    plausible), biases, BN affine and running statistics, GN affine, per-level scales.
    """
    from mmcv.cnn import Scale

    g = torch.Generator().manual_seed(seed)

    def normal_(t, std, mean=0.0):
        t.copy_(torch.randn(t.shape, generator=g) * std + mean)

    def uniform_(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g) * (hi - lo) + lo)

    head = getattr(model, "bbox_head", None)
    special_std = {
        id(getattr(head, name).weight): std
        for name, std in PREDICTION_CONV_STDS.items()
        if hasattr(head, name)
    }
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            uniform_(module.weight, 0.4, 0.9)
            normal_(module.bias, 0.1)
            normal_(module.running_mean, 0.1)
            uniform_(module.running_var, 0.5, 1.5)
            module.num_batches_tracked.fill_(int(torch.randint(1, 10**6, (1,), generator=g)))
        elif isinstance(module, torch.nn.GroupNorm):
            uniform_(module.weight, 0.5, 1.5)
            normal_(module.bias, 0.1)
        elif isinstance(module, Scale):
            uniform_(module.scale, 0.6, 1.4)
        else:
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.nn.Parameter) and weight.dim() == 4:
                fan_in = weight[0].numel()
                if id(weight) in special_std:
                    std = special_std[id(weight)]
                elif name.endswith("conv_offset"):
                    std = 0.5 / fan_in**0.5  # offsets and mask logits of order 1
                else:
                    std = (2.0 / fan_in) ** 0.5
                normal_(weight, std)
                bias = getattr(module, "bias", None)
                if isinstance(bias, torch.nn.Parameter):
                    normal_(bias, 0.1)
    for name in CLASSIFIERS:
        if hasattr(head, name):
            uniform_(getattr(head, name).bias, -4.0, -3.0)
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all():
            raise RuntimeError(f"perturb_ left {name} non-finite")


def d2_cfg(config_file: str, num_classes: int, head: str = "VFNET"):
    from detectron2.config import get_cfg

    from vfnet.config import add_vfnet_config

    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config_file))
    cfg.MODEL[head].NUM_CLASSES = num_classes
    cfg.MODEL.DEVICE = "cpu"
    cfg.MODEL.WEIGHTS = ""
    return cfg


def convert_and_load(mm_model, variant: str, num_classes: int, workdir: str):
    """
    Save the MMDetection model as an MMDetection checkpoint (with a ``meta`` dict), convert it
    as tools/convert_mmdet_to_d2.py does (checking against the config; the summary is printed),
    build the Detectron2 model and load the result with DetectionCheckpointer. Returns (model,
    cfg, incompatible keys, state dict).
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    config_file = VARIANTS[variant][1]
    src = os.path.join(workdir, f"mmdet_{variant}.pth")
    dst = os.path.join(workdir, f"d2_{variant}.pth")
    torch.save(
        {
            "meta": {
                "mmdet_version": "3.3.0",
                "epoch": 12,
                "CLASSES": tuple(f"c{i}" for i in range(num_classes)),
                "seed": np.int64(0),
            },
            "state_dict": mm_model.state_dict(),
        },
        src,
    )
    summary = convert_checkpoint_file(
        src, dst, os.path.join(REPO, config_file), ["MODEL.VFNET.NUM_CLASSES", str(num_classes)]
    )
    print(summary)
    cfg = d2_cfg(config_file, num_classes)
    model = build_model(cfg).eval()
    checkpointer = DetectionCheckpointer(model)
    captured = {}
    load_model = checkpointer._load_model

    def capture(checkpoint):
        captured["incompatible"] = load_model(checkpoint)
        return captured["incompatible"]

    checkpointer._load_model = capture
    checkpointer.load(dst)
    return model, cfg, captured["incompatible"], torch.load(dst, weights_only=True)["model"]


# ----------------------------------------------------------------------------- inputs
def read_rgb(path: Optional[str]) -> np.ndarray:
    """HxWx3 uint8 RGB (the image, or a deterministic synthetic one when it is missing)."""
    if path and os.path.exists(path):
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (417, 650, 3), dtype=np.uint8)
    img[100:300, 150:450] = (200, 120, 60)
    return img


def gt_boxes_for(path: Optional[str]) -> List[List[float]]:
    """Ground-truth boxes (x1, y1, x2, y2) of the raccoon image from the dataset's json."""
    if path and os.path.exists(path):
        root = os.path.dirname(os.path.dirname(path))
        for split in ("train.json", "val.json"):
            f = os.path.join(root, split)
            if not os.path.exists(f):
                continue
            data = json.load(open(f))
            ids = [im["id"] for im in data["images"] if im["file_name"] == os.path.basename(path)]
            if ids:
                return [
                    [
                        a["bbox"][0],
                        a["bbox"][1],
                        a["bbox"][0] + a["bbox"][2],
                        a["bbox"][1] + a["bbox"][3],
                    ]
                    for a in data["annotations"]
                    if a["image_id"] == ids[0]
                ]
    return [[150.0, 100.0, 450.0, 300.0]]


def resize_like_mmdet(img: np.ndarray, scale: Tuple[int, int]) -> np.ndarray:
    """mmcv.imrescale (keep ratio, cv2 bilinear), as MMDetection's test Resize."""
    import mmcv

    return mmcv.imrescale(img, scale, interpolation="bilinear", backend="cv2")


def training_batch(image_path: Optional[str], size=(256, 384), num_classes: int = 3):
    """
    Two images of `size` (H, W) (the image squashed to that size, and its mirror) with
    ground truth: the dataset's boxes (class 0) plus a small and a large synthetic box.
    """
    import cv2
    from detectron2.structures import Boxes, Instances

    img = read_rgb(image_path)
    h0, w0 = img.shape[:2]
    H, W = size
    img = cv2.resize(img, (W, H), interpolation=cv2.INTER_LINEAR)
    sx, sy = W / w0, H / h0
    boxes = [[b[0] * sx, b[1] * sy, b[2] * sx, b[3] * sy] for b in gt_boxes_for(image_path)]
    batch = []
    for flip in (False, True):
        im = img[:, ::-1] if flip else img
        bx = [[W - b[2], b[1], W - b[0], b[3]] if flip else list(b) for b in boxes]
        bx += (
            [[12.0, 20.0, 44.0, 58.0], [0.3 * W, 0.15 * H, 0.98 * W, 0.95 * H]]
            if not flip
            else [[200.0, 150.0, 229.0, 171.0], [10.0, 5.0, 0.6 * W, 0.7 * H]]
        )
        labels = [0] * (len(bx) - 2) + [1 % num_classes, 2 % num_classes]
        inst = Instances((H, W))
        inst.gt_boxes = Boxes(torch.tensor(bx, dtype=torch.float32))
        inst.gt_classes = torch.tensor(labels, dtype=torch.int64)
        batch.append(
            {
                "image": torch.as_tensor(np.ascontiguousarray(im.transpose(2, 0, 1))).float(),
                "instances": inst,
            }
        )
    return batch


def mmdet_samples(batch, batch_shape):
    """MMDetection's data samples of `batch` padded to `batch_shape`; each image's own pad_shape
    is its size padded to a multiple of 32, as MMDetection's data preprocessor gives it."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    samples = []
    for item in batch:
        inst = item["instances"]
        s = DetDataSample(
            metainfo=dict(
                img_shape=tuple(inst.image_size),
                ori_shape=tuple(inst.image_size),
                pad_shape=tuple(-(-int(x) // 32) * 32 for x in inst.image_size),
                batch_input_shape=tuple(batch_shape),
                scale_factor=(1.0, 1.0),
            )
        )
        gt = InstanceData()
        gt.bboxes = inst.gt_boxes.tensor.clone()
        gt.labels = inst.gt_classes.clone()
        s.gt_instances = gt
        samples.append(s)
    return samples


# ----------------------------------------------------------------------------- comparisons
def diff(a: torch.Tensor, b: torch.Tensor) -> Tuple[float, float]:
    """(max |a - b|, max |a - b| / max |b|): `b` is MMDetection's (the reference)."""
    a, b = a.detach().double(), b.detach().double()
    if a.shape != b.shape:
        raise AssertionError(f"shape {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.numel() == 0:
        return 0.0, 0.0
    d = (a - b).abs().max().item()
    return d, d / max(b.abs().max().item(), 1e-12)


class Report:
    def __init__(self):
        self.rows: List[Tuple[str, str, float, float]] = []  # (group, name, abs, rel)
        self.facts: Dict[str, object] = {}
        self.objects: Dict[str, object] = {}  # models and inputs, for further checks

    def add(self, group, name, a, b):
        abs_, rel = diff(a, b)
        self.rows.append((group, name, abs_, rel))
        return abs_, rel

    def max(self, group) -> Tuple[float, float]:
        rows = [r for r in self.rows if r[0] == group]
        return max(r[2] for r in rows), max(r[3] for r in rows)

    def table(self) -> str:
        lines = [f"{'group':<12} {'tensor':<34} {'max abs diff':>14} {'max rel diff':>14}"]
        for group, name, a, r in self.rows:
            lines.append(f"{group:<12} {name:<34} {a:>14.3e} {r:>14.3e}")
        for k, v in self.facts.items():
            lines.append(f"{k}: {v}")
        return "\n".join(lines)


def pair_detections(d2_boxes, d2_scores, d2_labels, mm_boxes, mm_scores, mm_labels):
    """
    Pair the two detection lists one to one: each Detectron2 detection (by decreasing score)
    takes the unused MMDetection detection of the same class with the nearest box (max
    coordinate difference), so that near-equal scores sorting differently do not matter.
    Returns the paired (boxes, scores, labels) of both, in Detectron2's score order; with
    different class multisets the labels differ and the pairing is partial.
    """
    order = torch.argsort(d2_scores, descending=True, stable=True).tolist()
    used = torch.zeros(len(mm_boxes), dtype=torch.bool)
    pairs = []
    for i in order:
        cost = (mm_boxes - d2_boxes[i]).abs().amax(dim=1)
        cost[(mm_labels != d2_labels[i]) | used] = float("inf")
        j = int(torch.argmin(cost)) if len(cost) else -1
        if j < 0 or not torch.isfinite(cost[j]):
            j = int(torch.nonzero(~used)[0]) if (~used).any() else -1
        if j < 0:
            break
        used[j] = True
        pairs.append((i, j))
    i1 = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    i2 = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return (d2_boxes[i1], d2_scores[i1], d2_labels[i1]), (
        mm_boxes[i2],
        mm_scores[i2],
        mm_labels[i2],
    )


@torch.no_grad()
def run_parity(
    variant: str = "r50",
    num_classes: int = 3,
    seed: int = 0,
    image_path: Optional[str] = DEFAULT_IMAGE,
    workdir: Optional[str] = None,
    det_scale: Tuple[int, int] = (448, 256),
) -> Report:
    from detectron2.utils.events import EventStorage

    report = Report()
    report.facts["mmcv kernels"] = install_mmcv_ops_standins()
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = stack.enter_context(tempfile.TemporaryDirectory())
        mm, _ = build_mmdet_model(variant, num_classes)
        perturb_and_record(mm, seed, report)
        model, cfg, incompatible, converted = convert_and_load(mm, variant, num_classes, workdir)
        record_loading(model, incompatible, converted, report)

        # ------------------------------------------------ features and head outputs
        batch = training_batch(image_path, num_classes=num_classes)
        images = model.preprocess_image(batch)
        x = images.tensor
        mm.train()  # the head returns the initial boxes in train mode; BN stays frozen (norm_eval)
        model.train()
        d2_feats = model.backbone(x)
        mm_feats = mm.extract_feat(x)
        for i, f in enumerate(model.head_in_features):
            report.add("features", f, d2_feats[f], mm_feats[i])
        d2_feats = [d2_feats[f] for f in model.head_in_features]
        logits, boxes_init, boxes_refine = model.head(d2_feats)
        mm_cls, mm_bbox, mm_bbox_rf = mm.bbox_head(mm_feats)
        report.objects.update(
            d2_model=model,
            mm_model=mm,
            input=x,
            d2_features=d2_feats,
            mm_head_outputs=(mm_cls, mm_bbox, mm_bbox_rf),
        )
        for i in range(len(logits)):
            report.add("head", f"logits p{i + 3}", logits[i], mm_cls[i])
            report.add("head", f"boxes_init p{i + 3}", boxes_init[i], mm_bbox[i])
            report.add("head", f"boxes_refine p{i + 3}", boxes_refine[i], mm_bbox_rf[i])

        # ------------------------------------------------ ATSS assignment
        gt_instances = [b["instances"] for b in batch]
        anchors = model.anchor_generator(d2_feats)
        gt_labels, gt_boxes = model.label_anchors(
            anchors, gt_instances, [b["instances"].image_size for b in batch]
        )
        samples = mmdet_samples(batch, x.shape[-2:])
        from mmdet.models.utils import unpack_gt_instances

        batch_gt, batch_ignore, metas = unpack_gt_instances(samples)
        head = mm.bbox_head
        points = head.fcos_prior_generator.grid_priors(
            [c.shape[-2:] for c in mm_cls], x.dtype, x.device
        )
        labels, _, targets, _ = head.get_targets(mm_cls, points, batch_gt, metas, batch_ignore)
        n = x.shape[0]
        mm_labels = torch.cat([l.reshape(n, -1) for l in labels], dim=1)
        mm_pts = torch.cat(points)
        mm_tboxes = torch.cat([t.reshape(n, -1, 4) for t in targets], dim=1)
        mm_tboxes = torch.cat([mm_pts - mm_tboxes[..., :2], mm_pts + mm_tboxes[..., 2:]], dim=-1)
        d2_labels = torch.stack(gt_labels)
        d2_tboxes = torch.stack(gt_boxes)
        d2_pts = torch.cat([a.get_centers() for a in anchors])
        report.add("atss", "locations (x, y)", d2_pts, mm_pts)
        pos_d2 = d2_labels != num_classes
        pos_mm = mm_labels != num_classes
        report.facts["atss positives (d2, mmdet)"] = (int(pos_d2.sum()), int(pos_mm.sum()))
        report.facts["atss same positive locations"] = bool(torch.equal(pos_d2, pos_mm))
        report.facts["atss same classes"] = bool(torch.equal(d2_labels, mm_labels))
        if torch.equal(pos_d2, pos_mm):
            report.add("atss", "target boxes of positives", d2_tboxes[pos_d2], mm_tboxes[pos_mm])

        # ------------------------------------------------ losses
        with EventStorage(0):
            d2_losses = model(batch)  # the full training forward (normalise, pad, ATSS, losses)
        # MMDetection's loss_by_feat on the head outputs above (= mm.loss(x, samples) without
        # running the network a second time)
        mm_losses = head.loss_by_feat(mm_cls, mm_bbox, mm_bbox_rf, batch_gt, metas, batch_ignore)
        for d2_name, mm_name in (
            ("loss_cls", "loss_cls"),
            ("loss_bbox", "loss_bbox"),
            ("loss_bbox_refine", "loss_bbox_rf"),
        ):
            report.add("losses", f"{d2_name} / {mm_name}", d2_losses[d2_name], mm_losses[mm_name])
        report.facts["losses d2"] = {k: round(float(v), 6) for k, v in d2_losses.items()}
        report.facts["losses mmdet"] = {k: round(float(v), 6) for k, v in mm_losses.items()}

        # ------------------------------------------------ detections on a real image
        model.eval()
        mm.eval()
        compare_detections(report, model, mm, read_rgb(image_path), det_scale)
    return report


def compare_detections(report, model, mm, img: np.ndarray, det_scale, clip_resized: bool = False):
    """
    Detect on the RGB image `img` resized as MMDetection's test pipeline (`det_scale`) in both
    frameworks (eval mode) and add to `report` the detections' counts, classes, boxes and scores,
    at the resized and at the original size. `clip_resized`: clip Detectron2's boxes at the
    resized size first (MMDetection clips them when it decodes; Detectron2's RetinaNet only in
    detector_postprocess). Returns (images, (h0, w0), MMDetection's detections at the original
    size).
    """
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import Boxes, Instances

    h0, w0 = img.shape[:2]
    resized = resize_like_mmdet(img, det_scale)
    h, w = resized.shape[:2]
    image = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1))).float()
    images = model.preprocess_image([{"image": image, "height": h0, "width": w0}])
    feats = model.backbone(images.tensor)
    feats = [feats[f] for f in model.head_in_features]
    d2_det = model.forward_inference(images, feats, model.head(feats))[0]
    boxes = d2_det.pred_boxes.tensor.clone()
    fields = dict(scores=d2_det.scores, pred_classes=d2_det.pred_classes)
    d2_resized = Instances((h, w), pred_boxes=Boxes(boxes.clone()), **fields)
    if clip_resized:
        d2_resized.pred_boxes.clip((h, w))
    # what DenseDetector.forward returns for this input: rescaled to (height, width) (on a copy:
    # detector_postprocess scales the boxes in place)
    d2_orig = Instances(d2_det.image_size, pred_boxes=Boxes(boxes), **fields)
    d2_orig = detector_postprocess(d2_orig, h0, w0)
    meta = dict(
        img_shape=(h, w),
        ori_shape=(h0, w0),
        scale_factor=(w / w0, h / h0),
        pad_shape=tuple(images.tensor.shape[-2:]),
        batch_input_shape=tuple(images.tensor.shape[-2:]),
    )
    mm_out = mm.bbox_head(mm.extract_feat(images.tensor))
    mm_det = mm.bbox_head.predict_by_feat(*mm_out, batch_img_metas=[meta], rescale=False)[0]
    mm_orig = mm.bbox_head.predict_by_feat(*mm_out, batch_img_metas=[meta], rescale=True)[0]
    report.facts["detection input (resized, padded)"] = ((h, w), tuple(images.tensor.shape[-2:]))
    for tag, d2r, mmr in (("resized", d2_resized, mm_det), ("original", d2_orig, mm_orig)):
        report.facts[f"detections {tag} (d2, mmdet)"] = (len(d2r), len(mmr))
        if len(d2r) != len(mmr):
            continue
        (b1, s1, l1), (b2, s2, l2) = pair_detections(
            d2r.pred_boxes.tensor, d2r.scores, d2r.pred_classes, mmr.bboxes, mmr.scores, mmr.labels
        )
        report.add("detections", f"boxes ({tag} image, px)", b1, b2)
        report.add("detections", f"scores ({tag} image)", s1, s2)
        report.facts[f"detections {tag} same classes"] = bool(torch.equal(l1, l2))
    return images, (h0, w0), mm_orig


# ----------------------------------------------------------------------------- pipelines
def pipeline_report(image_path: str, num_samples: int = 200000) -> Dict[str, object]:
    """
    Each framework's own preprocessing: JPEG decode (cv2 vs PIL), test resize size rounding
    (mmcv.rescale_size vs ResizeShortestEdge.get_output_shape), interpolation (cv2 bilinear vs
    PIL bilinear).
    """
    import cv2
    import mmcv
    from detectron2.data import detection_utils as utils
    from detectron2.data import transforms as T

    facts: Dict[str, object] = {}
    mm_img = mmcv.imread(image_path, channel_order="rgb")  # cv2 decode
    d2_img = utils.read_image(image_path, format="RGB")  # PIL decode
    facts["decode: max |cv2 - PIL| (uint8)"] = int(
        np.abs(mm_img.astype(int) - d2_img.astype(int)).max()
    )
    h0, w0 = d2_img.shape[:2]
    aug = T.ResizeShortestEdge(800, 1333)
    tfm = aug.get_transform(d2_img)
    d2_res = tfm.apply_image(d2_img)
    mm_res = mmcv.imrescale(d2_img, (1333, 800), interpolation="bilinear", backend="cv2")
    facts["resize 1333x800 of the image (d2, mmdet)"] = (d2_res.shape[:2], mm_res.shape[:2])
    if d2_res.shape == mm_res.shape:
        dd = np.abs(d2_res.astype(int) - mm_res.astype(int))
        facts["resize: |PIL bilinear - cv2 bilinear| max / mean (uint8)"] = (
            int(dd.max()),
            round(float(dd.mean()), 3),
        )
    rng = np.random.default_rng(0)
    hs = rng.integers(16, 4000, num_samples)
    ws = rng.integers(16, 4000, num_samples)
    mismatch = []
    for hh, ww in zip(hs.tolist(), ws.tolist()):
        a = T.ResizeShortestEdge.get_output_shape(hh, ww, 800, 1333)
        new_w, new_h = mmcv.rescale_size((ww, hh), (1333, 800))
        if a != (new_h, new_w):
            mismatch.append(((hh, ww), a, (new_h, new_w)))
    facts[f"resize size mismatches over {num_samples} random (h, w)"] = (
        len(mismatch),
        mismatch[:3],
    )
    # the pyramid of downscaling: when the image is shrunk PIL low-pass filters, cv2 does not
    small = cv2.resize(d2_img, (w0 * 3, h0 * 3), interpolation=cv2.INTER_NEAREST)
    t2 = aug.get_transform(small)
    dd = np.abs(
        t2.apply_image(small).astype(int)
        - mmcv.imrescale(small, (1333, 800), interpolation="bilinear", backend="cv2").astype(int)
    )
    facts["downscale (3x image): |PIL - cv2| max / mean (uint8)"] = (
        int(dd.max()),
        round(float(dd.mean()), 3),
    )
    return facts


def synthetic_predictions(
    num_classes: int = 3, image_size=(100, 150), padded=(128, 160), seed: int = 0
):
    """
    Head outputs (logits, distances) for post-processing edge cases: random scores and boxes,
    plus confident boxes from the locations in the right padding (x >= image width) that lie
    entirely right of the image, so that clipping makes them empty.
    """
    import math

    g = torch.Generator().manual_seed(seed)
    h, w = image_size
    logits, distances, shapes = [], [], []
    for s in (8, 16, 32, 64, 128):
        fh, fw = math.ceil(padded[0] / s), math.ceil(padded[1] / s)
        lg = torch.randn(1, num_classes, fh, fw, generator=g) - 3.5
        d = torch.exp(torch.randn(1, 4, fh, fw, generator=g) * 0.5) * s * 2
        xs = torch.arange(fw) * s
        pad = xs >= w
        d[0, 0][:, pad] = 0.5 * (xs[pad] - w).clamp(min=1).float()  # x1 = x - l > w
        lg[0][:, :, pad] += 5
        logits.append(lg)
        distances.append(d)
        shapes.append((fh, fw))
    return logits, distances, shapes


@torch.no_grad()
def postprocess_edge_case_report(num_classes: int = 3) -> Report:
    """
    The same synthetic head outputs through both post-processings (Detectron2's
    forward_inference + detector_postprocess, MMDetection's predict_by_feat), image 100x150
    padded to 128x160, output size = input size.
    """
    from detectron2.modeling import build_model
    from detectron2.modeling.postprocessing import detector_postprocess
    from detectron2.structures import ImageList

    install_mmcv_ops_standins()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    report = Report()
    cfg = mmdet_config("r50", num_classes)
    head = MODELS.build(
        dict(cfg.model.bbox_head, test_cfg=cfg.model.test_cfg, train_cfg=cfg.model.train_cfg)
    ).eval()
    model = build_model(d2_cfg(VARIANTS["r50"][1], num_classes)).eval()
    (h, w), padded = (100, 150), (128, 160)
    logits, distances, shapes = synthetic_predictions(num_classes, (h, w), padded)
    images = ImageList(torch.zeros(1, 3, *padded), [(h, w)])
    feats = [torch.zeros(1, 1, *s) for s in shapes]
    d2 = model.forward_inference(images, feats, (logits, [], distances))[0]
    report.facts["d2 empty boxes after NMS (before detector_postprocess)"] = int(
        (~d2.pred_boxes.nonempty()).sum()
    )
    d2 = detector_postprocess(d2, h, w)
    meta = dict(img_shape=(h, w), ori_shape=(h, w), scale_factor=(1.0, 1.0), pad_shape=padded)
    mm = head.predict_by_feat(logits, distances, batch_img_metas=[meta], rescale=True)[0]
    report.facts["detections (d2, mmdet)"] = (len(d2), len(mm))
    if len(d2) == len(mm):
        (b1, s1, l1), (b2, s2, l2) = pair_detections(
            d2.pred_boxes.tensor, d2.scores, d2.pred_classes, mm.bboxes, mm.scores, mm.labels
        )
        report.add("postprocess", "boxes (px)", b1, b2)
        report.add("postprocess", "scores", s1, s2)
        report.facts["same classes"] = bool(torch.equal(l1, l2))
    return report


def greedy_match(d2r, mmr, iou_thr: float = 0.9):
    """
    Match each Detectron2 detection (by decreasing score) to the unmatched MMDetection
    detection of the same class with the highest IoU (>= `iou_thr`). Returns (number
    matched, max |box diff| px, max |score diff|) over the matched pairs.
    """
    from torchvision.ops import box_iou

    b1, s1, l1 = d2r.pred_boxes.tensor, d2r.scores, d2r.pred_classes
    b2, s2, l2 = mmr.bboxes, mmr.scores, mmr.labels
    if len(b1) == 0 or len(b2) == 0:
        return 0, 0.0, 0.0
    iou = box_iou(b1, b2)
    iou[l1[:, None] != l2[None, :]] = -1
    used = torch.zeros(len(b2), dtype=torch.bool)
    n, box_d, score_d = 0, 0.0, 0.0
    for i in torch.argsort(s1, descending=True).tolist():
        row = iou[i].clone()
        row[used] = -1
        j = int(row.argmax())
        if row[j] >= iou_thr:
            used[j] = True
            n += 1
            box_d = max(box_d, float((b1[i] - b2[j]).abs().max()))
            score_d = max(score_d, float((s1[i] - s2[j]).abs()))
    return n, round(box_d, 4), round(score_d, 6)


@torch.no_grad()
def end_to_end_report(
    variant: str, image_path: str, num_classes: int = 80, seed: int = 0
) -> Dict[str, object]:
    """
    Full test pipelines of both frameworks on the image (each its own decode, resize, pad,
    post-processing to original-image coordinates), with the same converted weights; then
    again with INPUT.RESIZE_BACKEND "cv2" (MMDetection's resize).
    """
    from mmengine.dataset import Compose
    from PIL import Image

    from vfnet.data.mapper import VFNetDatasetMapper

    install_mmcv_ops_standins()
    facts: Dict[str, object] = {}
    with tempfile.TemporaryDirectory() as tmp:
        mm, mm_cfg = build_mmdet_model(variant, num_classes)
        perturb_(mm, seed)
        model, cfg, _, _ = convert_and_load(mm, variant, num_classes, tmp)
        pipeline = Compose([t for t in mm_cfg.test_pipeline if t["type"] != "LoadAnnotations"])
        data = pipeline(dict(img_path=image_path, img_id=0))
        data = mm.data_preprocessor(
            dict(inputs=[data["inputs"]], data_samples=[data["data_samples"]]), False
        )
        mm_res = mm.predict(data["inputs"], data["data_samples"], rescale=True)[0].pred_instances
        W0, H0 = Image.open(image_path).size
        record = {"file_name": image_path, "height": H0, "width": W0, "image_id": 0}
        for backend in ("PIL", "cv2"):
            tag = f"{backend} resize"
            cfg_backend = cfg.clone()
            cfg_backend.defrost()
            cfg_backend.INPUT.RESIZE_BACKEND = backend
            d2_in = VFNetDatasetMapper(cfg_backend, is_train=False)(dict(record))
            d2_res = model([d2_in])[0]["instances"]
            n, box_d, score_d = greedy_match(d2_res, mm_res)
            padded = model.preprocess_image([d2_in]).tensor
            same_shape = tuple(padded.shape) == tuple(data["inputs"].shape)
            input_diff = (
                float((padded - data["inputs"]).abs().max()) if same_shape else float("nan")
            )
            facts[f"e2e [{tag}] normalised padded input (d2, mmdet), max |diff|"] = (
                tuple(padded.shape[-2:]),
                tuple(data["inputs"].shape[-2:]),
                round(input_diff, 6),
            )
            facts[
                f"e2e [{tag}] detections (d2, mmdet), matched (same class, IoU>=0.9), max |box diff| px, max |score diff|"
            ] = (len(d2_res), len(mm_res), n, box_d, score_d)
    return facts
