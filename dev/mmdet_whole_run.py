"""
Whole training runs in MMDetection 3.3 and in this project on the same data and recipe: the
recipe of a Detectron2 YAML config (the shapes demo's: ResNet-18-FPN of 64 channels from scratch,
AdamW, warm-up, steps, iterations, batch, input sizes, flip) written as an MMDetection config for
its VFNet, FCOS (center sampling, GIoU, centerness on the regression branch) and ATSS, trained
by MMDetection's own runner, data pipeline, sampler, optimizer wrapper and COCO metric; this
project's runs are commands of tools/train_net.py and tools/lazyconfig_train_net.py.

A run writes into its output directory; `result.json` there holds what the comparison reads of
it (box AP, AP50, AP75, per-class AP and the loss curve), written last, so that an interrupted
comparison goes on where it stopped. The loss curves of both frameworks are read the same way:
at every 20th iteration, the median of the last 20 iterations' values (Detectron2's
metrics.json; MMDetection logs every iteration and the medians are taken here).

MMDetection and mmengine are imported only by the functions that build or run MMDetection's
models (the parity environment of tools/install.sh --parity-env).
"""
import glob
import json
import os
import statistics
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

from vfnet.utils.file_io import atomic_write

from . import REPO

__all__ = [
    "DEMO_CONFIG",
    "LOSS_NAMES",
    "Run",
    "load_d2_recipe",
    "loss_windows",
    "mmdet_config",
    "ordering_runs",
    "parity_runs",
    "read_result",
    "small_object_runs",
    "summarize",
    "train_mmdet",
    "verdict",
    "write_init",
]

DEMO_CONFIG = "configs/VFNet_Shapes_Demo.yaml"
FCOS_CONFIG = "configs/lazy/fcos_shapes_demo.py"
RETINANET_CONFIG = "configs/RetinaNet_Shapes_Demo.yaml"
# Detectron2's writers: every 20 iterations, the median of the last 20 values of each loss.
WINDOW = 20

# MMDetection's base config of each detector (mmdet/.mim/configs); the model is taken from it
# and given the recipe's backbone, neck width, classes and input normalisation.
MMDET_BASE = {
    "VFNet": "vfnet/vfnet_r50_fpn_1x_coco.py",
    "FCOS": "fcos/fcos_r50-caffe_fpn_gn-head-center-normbbox-centeronreg-giou_1x_coco.py",
    "ATSS": "atss/atss_r50_fpn_1x_coco.py",
}
# Each framework's names of the same losses (VFNet): MMDetection's -> Detectron2's.
LOSS_NAMES = {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_bbox_rf": "loss_bbox_refine"}

# The paper's Table 3 rows as switches of this project's VFNet (MODEL.VFNET.*): the raw VFNet
# (ATSS without centerness, focal loss, plain 3x3 convs, no refinement), then each component.
TABLE3_ROWS = {
    "raw": ["MODEL.VFNET.CLS_LOSS_TYPE", "focal", "MODEL.VFNET.USE_STAR_DCN", "False",
            "MODEL.VFNET.USE_REFINE", "False"],
    "+VFL": ["MODEL.VFNET.USE_STAR_DCN", "False", "MODEL.VFNET.USE_REFINE", "False"],
    "+star": ["MODEL.VFNET.USE_REFINE", "False"],
    "VFNet": [],
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    """
    One training run: `argv` (relative to the repository root, run with the comparison's Python)
    writes into `output_dir`; `init` names the MMDetection initialisation (a file that
    :func:`write_init` makes) it starts from, if any.
    """

    study: str  # "parity", "ordering", "small"
    framework: str  # "mmdet" or "detectron2"
    detector: str  # "VFNet", "FCOS", "ATSS", "RetinaNet", or a Table 3 row ("raw", ...)
    seed: int
    argv: Tuple[str, ...]
    output_dir: str
    variant: str = ""  # e.g. "anchor 4", "input x2"
    init: Optional[str] = None
    parent: Optional[str] = None  # run_all's field: a run this one waits for (none here)


# ----------------------------------------------------------------------------- the recipe
def load_d2_recipe(config_file: str = DEMO_CONFIG, opts: Sequence[str] = ()):
    """The Detectron2 config whose recipe both frameworks train with."""
    from detectron2.config import get_cfg

    from vfnet.config import add_vfnet_config

    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config_file))
    cfg.merge_from_list(list(opts))
    return cfg


def _resnet_channels(cfg) -> List[int]:
    """The output channels of res2..res5 of the config's ResNet."""
    res2 = cfg.MODEL.RESNETS.RES2_OUT_CHANNELS
    return [res2 * 2**i for i in range(4)]


def mmdet_config(
    detector: str,
    cfg,
    train: Tuple[str, str],
    val: Tuple[str, str],
    classes: Sequence[str],
    seed: int,
    work_dir: str,
    anchor_scale: Optional[int] = None,
):
    """
    The mmengine Config that trains MMDetection's `detector` with the recipe of the Detectron2
    config `cfg`: its backbone (ResNet depth, BatchNorm that trains, frozen stages), FPN width,
    pixel mean/std and channel order, optimizer (AdamW or SGD, lr, betas, momentum, weight decay
    with Detectron2's groups: none on norm layers and biases when WEIGHT_DECAY_NORM/BIAS are 0),
    linear warm-up, steps, iterations, batch size, workers, input sizes (keep ratio) and flip,
    training-set filter, seed. `train`, `val`: (COCO JSON, image folder). `anchor_scale`: the
    ATSS anchor's side in strides (VFNet and ATSS; None: MMDetection's 8).
    """
    import mmdet
    from mmengine.config import Config

    solver, inp = cfg.SOLVER, cfg.INPUT
    if len(inp.MIN_SIZE_TRAIN) != 1 or inp.MAX_SIZE_TRAIN_RANGE:
        raise ValueError("mmdet_config: only one training scale (INPUT.MIN_SIZE_TRAIN) is written")
    if solver.OPTIMIZER not in ("AdamW", "SGD") or solver.PARAM_GROUPS != "detectron2":
        raise ValueError("mmdet_config: only SOLVER.OPTIMIZER AdamW/SGD with PARAM_GROUPS detectron2")
    base = os.path.join(os.path.dirname(mmdet.__file__), ".mim", "configs", MMDET_BASE[detector])
    mm = Config.fromfile(base)
    model = mm.model
    model.data_preprocessor = dict(
        type="DetDataPreprocessor",
        mean=list(cfg.MODEL.PIXEL_MEAN),
        std=list(cfg.MODEL.PIXEL_STD),
        bgr_to_rgb=cfg.INPUT.FORMAT == "RGB",  # MMDetection reads BGR
        pad_size_divisor=32,
    )
    norm = {"BN": "BN", "SyncBN": "SyncBN", "GN": "GN"}[cfg.MODEL.RESNETS.NORM]
    model.backbone = dict(
        type="ResNet",
        depth=cfg.MODEL.RESNETS.DEPTH,
        num_stages=4,
        out_indices=(0, 1, 2, 3),
        frozen_stages=cfg.MODEL.BACKBONE.FREEZE_AT - 1,
        norm_cfg=dict(type=norm, requires_grad=True),
        norm_eval=cfg.MODEL.BACKBONE.NORM_EVAL,
        style="caffe" if cfg.MODEL.RESNETS.STRIDE_IN_1X1 and cfg.MODEL.RESNETS.DEPTH >= 50 else "pytorch",
        init_cfg=None,
    )
    width = cfg.MODEL.FPN.OUT_CHANNELS
    model.neck.in_channels = _resnet_channels(cfg)
    model.neck.out_channels = width
    head = model.bbox_head
    head.num_classes = len(classes)
    head.in_channels = head.feat_channels = width
    if anchor_scale is not None:
        if detector not in ("VFNet", "ATSS"):
            raise ValueError(f"mmdet_config: {detector} has no ATSS anchor")
        head.anchor_generator = dict(
            type="AnchorGenerator", ratios=[1.0], octave_base_scale=anchor_scale,
            scales_per_octave=1, strides=[8, 16, 32, 64, 128],
            **({"center_offset": 0.0} if detector == "VFNet" else {}),
        )  # fmt: skip

    scale = (inp.MAX_SIZE_TRAIN, inp.MIN_SIZE_TRAIN[0])  # MMDetection's (long, short)
    train_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="Resize", scale=scale, keep_ratio=True),
        dict(type="RandomFlip", prob=0.5 if inp.RANDOM_FLIP == "horizontal" else 0.0),
        dict(type="PackDetInputs"),
    ]
    test_pipeline = [
        dict(type="LoadImageFromFile"),
        dict(type="Resize", scale=(inp.MAX_SIZE_TEST, inp.MIN_SIZE_TEST), keep_ratio=True),
        dict(type="LoadAnnotations", with_bbox=True),
        dict(type="PackDetInputs",
             meta_keys=("img_id", "img_path", "ori_shape", "img_shape", "scale_factor")),
    ]  # fmt: skip

    def dataset(split, pipeline, test_mode):
        json_file, image_dir = split
        filt = None
        if not test_mode:
            if cfg.DATALOADER.TRAIN_FILTER == "mmdet":
                filt = dict(filter_empty_gt=True, min_size=cfg.DATALOADER.MIN_IMAGE_SIZE)
            else:
                filt = dict(filter_empty_gt=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS, min_size=0)
        return dict(
            type="CocoDataset", data_root="", ann_file=os.path.abspath(json_file),
            data_prefix=dict(img=os.path.abspath(image_dir) + os.sep),
            metainfo=dict(classes=tuple(classes)), filter_cfg=filt, pipeline=pipeline,
            test_mode=test_mode,
        )  # fmt: skip

    workers = cfg.DATALOADER.NUM_WORKERS
    mm.train_dataloader = dict(
        batch_size=solver.IMS_PER_BATCH,
        num_workers=workers,
        persistent_workers=workers > 0,
        sampler=dict(type="InfiniteSampler", shuffle=True),
        batch_sampler=dict(type="AspectRatioBatchSampler") if cfg.DATALOADER.ASPECT_RATIO_GROUPING else None,
        dataset=dataset(train, train_pipeline, False),
    )
    mm.val_dataloader = dict(
        batch_size=1, num_workers=workers, persistent_workers=False, drop_last=False,
        sampler=dict(type="DefaultSampler", shuffle=False),
        dataset=dataset(val, test_pipeline, True),
    )  # fmt: skip
    mm.test_dataloader = mm.val_dataloader
    mm.val_evaluator = dict(
        type="CocoMetric", ann_file=os.path.abspath(val[0]), metric="bbox", classwise=True
    )
    mm.test_evaluator = mm.val_evaluator

    wd = solver.WEIGHT_DECAY
    if solver.OPTIMIZER == "AdamW":
        optimizer = dict(type="AdamW", lr=solver.BASE_LR, betas=tuple(solver.BETAS), weight_decay=wd)
    else:
        optimizer = dict(type="SGD", lr=solver.BASE_LR, momentum=solver.MOMENTUM, weight_decay=wd,
                         nesterov=solver.NESTEROV)  # fmt: skip
    clip = None
    if solver.CLIP_GRADIENTS.ENABLED:
        if solver.CLIP_GRADIENTS.CLIP_TYPE != "full_model":
            raise ValueError("mmdet_config: only CLIP_GRADIENTS.CLIP_TYPE full_model")
        clip = dict(max_norm=solver.CLIP_GRADIENTS.CLIP_VALUE, norm_type=solver.CLIP_GRADIENTS.NORM_TYPE)
    # Detectron2's groups (get_default_optimizer_params): norm layers' parameters decay by
    # WEIGHT_DECAY_NORM, every bias by WEIGHT_DECAY_BIAS with lr x BIAS_LR_FACTOR; mmengine's
    # norm_decay_mult covers the norm layers' biases, bias_*_mult the other biases.
    mm.optim_wrapper = dict(
        type="OptimWrapper",
        optimizer=optimizer,
        paramwise_cfg=dict(
            norm_decay_mult=solver.WEIGHT_DECAY_NORM / wd if wd else 0.0,
            bias_decay_mult=(solver.WEIGHT_DECAY_BIAS if solver.WEIGHT_DECAY_BIAS is not None else wd) / wd if wd else 0.0,
            bias_lr_mult=solver.BIAS_LR_FACTOR,
        ),
        clip_grad=clip,
    )
    if solver.WARMUP_METHOD != "linear" or solver.LR_SCHEDULER_NAME != "WarmupMultiStepLR":
        raise ValueError("mmdet_config: only a linear warm-up and WarmupMultiStepLR")
    max_iter = solver.MAX_ITER
    # Detectron2's linear warm-up: lr x (f + (1 - f) i / WARMUP_ITERS) at iteration i. mmengine's
    # LinearLR reaches its end factor at iteration `end - 1` (lr x (f + (1 - f) i / (end - 1))):
    # end = WARMUP_ITERS + 1 is Detectron2's (MMDetection's configs write end = WARMUP_ITERS).
    mm.param_scheduler = [
        dict(type="LinearLR", start_factor=solver.WARMUP_FACTOR, by_epoch=False, begin=0,
             end=min(solver.WARMUP_ITERS + 1, max_iter)),
        dict(type="MultiStepLR", by_epoch=False, begin=0, end=max_iter,
             milestones=[s for s in solver.STEPS if s < max_iter], gamma=solver.GAMMA),
    ]  # fmt: skip
    # Evaluated once, after the last iteration.
    mm.train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iter, val_interval=max_iter)
    mm.val_cfg = dict(type="ValLoop")
    mm.test_cfg = dict(type="TestLoop")
    period = min(solver.CHECKPOINT_PERIOD, max_iter)
    mm.default_hooks = dict(
        timer=dict(type="IterTimerHook"),
        logger=dict(type="LoggerHook", interval=1),  # every iteration's losses in scalars.json
        param_scheduler=dict(type="ParamSchedulerHook"),
        checkpoint=dict(type="CheckpointHook", interval=period, by_epoch=False, max_keep_ckpts=1),
        sampler_seed=dict(type="DistSamplerSeedHook"),
        visualization=dict(type="DetVisualizationHook"),
    )
    mm.log_processor = dict(type="LogProcessor", window_size=1, by_epoch=False)
    mm.env_cfg = dict(cudnn_benchmark=False, mp_cfg=dict(mp_start_method="fork", opencv_num_threads=0),
                      dist_cfg=dict(backend="gloo"))  # fmt: skip
    mm.randomness = dict(seed=seed, deterministic=False)
    mm.work_dir = os.path.abspath(work_dir)
    mm.load_from = None
    mm.resume = False
    mm.auto_scale_lr = dict(enable=False, base_batch_size=solver.IMS_PER_BATCH)
    return mm


# ----------------------------------------------------------------------------- MMDetection runs
def write_init(detector: str, mm, path: str, seed: int, d2_path: Optional[str] = None,
               d2_config: str = DEMO_CONFIG, d2_opts: Sequence[str] = ()) -> None:  # fmt: skip
    """
    MMDetection's initialisation of `mm`'s model under `seed` (its init_weights) as an
    MMDetection checkpoint at `path`; with `d2_path`, also converted to this project's names by
    the converter, checked against the model of `d2_config` + `d2_opts`.
    """
    import torch
    from mmengine.logging import MMLogger
    from mmengine.runner import set_random_seed

    from vfnet.checkpoint.converter import convert_checkpoint_file

    from .mmdet_parity import install_mmcv_ops_standins

    install_mmcv_ops_standins()
    from mmdet.registry import MODELS
    from mmdet.utils import register_all_modules

    register_all_modules()
    MMLogger.get_instance("vfnet_write_init", log_level="WARNING")  # not every tensor's init
    set_random_seed(seed)
    model = MODELS.build(mm.model)
    model.init_weights()
    state = {"meta": {"seed": seed, "detector": detector}, "state_dict": model.state_dict()}
    atomic_write(path, lambda f: torch.save(state, f))
    if d2_path:
        convert_checkpoint_file(path, d2_path, os.path.join(REPO, d2_config), list(d2_opts))


def _last_checkpoint(work_dir: str) -> Optional[str]:
    tag = os.path.join(work_dir, "last_checkpoint")
    if os.path.isfile(tag):
        with open(tag) as f:
            path = f.read().strip()
        if os.path.isfile(path):
            return path
    return None


def train_mmdet(mm, load_from: Optional[str] = None) -> Dict[str, float]:
    """
    Train with MMDetection's Runner (from the last checkpoint in the work dir if there is one,
    else from `load_from`), evaluate after the last iteration, and write `result.json` in the
    work dir. Returns the evaluation's metrics, in percent as Detectron2's ("AP", "AP50",
    "AP-circle", ...).
    """
    from .mmdet_parity import install_mmcv_ops_standins

    install_mmcv_ops_standins()
    from mmdet.utils import register_all_modules
    from mmengine.hooks import Hook
    from mmengine.runner import Runner

    class KeepMetrics(Hook):
        metrics = None

        def after_val_epoch(self, runner, metrics=None):
            self.metrics = dict(metrics or {})

    register_all_modules()
    last = _last_checkpoint(mm.work_dir)
    mm.resume, mm.load_from = (True, last) if last else (False, load_from)
    runner = Runner.from_cfg(mm)
    keep = KeepMetrics()
    runner.register_hook(keep, priority="LOWEST")
    runner.train()  # its loop evaluates after the last iteration
    metrics = keep.metrics if keep.metrics is not None else runner.val()  # resumed at the end
    bbox = _mmdet_bbox_metrics(metrics, mm.train_dataloader.dataset.metainfo["classes"])
    write_result(mm.work_dir, "mmdet", bbox, _mmdet_losses(mm.work_dir))
    return bbox


def _mmdet_bbox_metrics(metrics: Mapping[str, float], classes: Sequence[str]) -> Dict[str, float]:
    """MMDetection's CocoMetric results in Detectron2's names and percent. An evaluation without
    any detection (CocoMetric returns no metric then, and logs why) is AP 0 on every key."""
    names = {"bbox_mAP": "AP", "bbox_mAP_50": "AP50", "bbox_mAP_75": "AP75", "bbox_mAP_s": "APs",
             "bbox_mAP_m": "APm", "bbox_mAP_l": "APl"}  # fmt: skip
    if not metrics:
        return {**{v: 0.0 for v in names.values()}, **{f"AP-{c}": 0.0 for c in classes}}
    out = {}
    for key, value in metrics.items():
        short = key.split("/", 1)[-1]
        if short in names:
            out[names[short]] = 100.0 * float(value)
        elif short.endswith("_precision") and short[: -len("_precision")] in classes:
            out["AP-" + short[: -len("_precision")]] = 100.0 * float(value)
    return out


def _mmdet_losses(work_dir: str) -> Dict[int, Dict[str, float]]:
    """Every iteration's losses from the scalars.json files of a work dir (resumed runs: several;
    the later one wins), keyed by Detectron2's 0-based iteration."""
    per_iter: Dict[int, Dict[str, float]] = {}
    for path in sorted(glob.glob(os.path.join(work_dir, "*", "vis_data", "scalars.json"))):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if "iter" not in record or "lr" not in record:
                    continue
                losses = {k: float(v) for k, v in record.items() if k.startswith("loss")}
                per_iter[int(record["iter"]) - 1] = losses  # MMDetection counts from 1
    return per_iter


def loss_windows(per_iter: Mapping[int, Mapping[str, float]], max_iter: int) -> Dict[int, Dict[str, float]]:
    """
    Per-iteration losses as Detectron2's writers give them: at each 20th iteration (19, 39, ...)
    and the last, the median of the values of the last 20 iterations.
    """
    ends = [i for i in range(max_iter) if (i + 1) % WINDOW == 0 or i == max_iter - 1]
    out = {}
    for end in ends:
        window = [per_iter[i] for i in range(max(0, end - WINDOW + 1), end + 1) if i in per_iter]
        if not window:
            continue
        names = set().union(*window)
        out[end] = {n: statistics.median(w[n] for w in window if n in w) for n in sorted(names)}
    return out


# ----------------------------------------------------------------------------- results
def write_result(output_dir: str, framework: str, bbox: Mapping[str, float],
                 per_iter: Mapping[int, Mapping[str, float]], windowed: bool = False) -> None:  # fmt: skip
    """`output_dir`/result.json: the box metrics and the loss curve (median windows)."""
    max_iter = max(per_iter) + 1 if per_iter else 0
    curve = per_iter if windowed else loss_windows(per_iter, max_iter)
    data = {"framework": framework, "bbox": dict(bbox), "losses": {str(k): v for k, v in sorted(curve.items())}}
    atomic_write(os.path.join(output_dir, "result.json"), lambda f: f.write(json.dumps(data, indent=1).encode()))


def d2_result(output_dir: str) -> Optional[dict]:
    """The final evaluation and loss curve of a Detectron2 run from its metrics.json, written as
    result.json; None while it has no final evaluation."""
    path = os.path.join(output_dir, "metrics.json")
    if not os.path.isfile(path):
        return None
    bbox, curve = None, {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # a line cut by an interruption
                continue
            if "bbox/AP" in record:
                bbox = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith("bbox/")}
            losses = {k: v for k, v in record.items() if k.startswith("loss")}
            if losses and "iteration" in record:
                curve[int(record["iteration"])] = losses
    if bbox is None:
        return None
    write_result(output_dir, "detectron2", bbox, curve, windowed=True)
    return read_result(output_dir)


def read_result(output_dir: str) -> Optional[dict]:
    """The run's result.json (Detectron2 runs: made from metrics.json first); None if unfinished."""
    path = os.path.join(output_dir, "result.json")
    if not os.path.isfile(path):
        return d2_result(output_dir) if os.path.isfile(os.path.join(output_dir, "metrics.json")) else None
    with open(path) as f:
        data = json.load(f)
    data["losses"] = {int(k): v for k, v in data["losses"].items()}
    return data


# ----------------------------------------------------------------------------- the runs
def _d2_dataset_args(train: Tuple[str, str], val: Tuple[str, str]) -> Tuple[str, ...]:
    return ("--dataset", f"cmp_train={os.path.abspath(train[0])}:{os.path.abspath(train[1])}",
            "--dataset", f"cmp_val={os.path.abspath(val[0])}:{os.path.abspath(val[1])}")  # fmt: skip


def scaled_sizes(cfg, input_scale: float) -> Dict[str, object]:
    inp = cfg.INPUT
    s = lambda v: int(round(v * input_scale))  # noqa: E731
    return {"INPUT.MIN_SIZE_TRAIN": tuple(s(v) for v in inp.MIN_SIZE_TRAIN),
            "INPUT.MAX_SIZE_TRAIN": s(inp.MAX_SIZE_TRAIN), "INPUT.MIN_SIZE_TEST": s(inp.MIN_SIZE_TEST),
            "INPUT.MAX_SIZE_TEST": s(inp.MAX_SIZE_TEST)}  # fmt: skip


def _yaml_opts(values: Mapping[str, object]) -> List[str]:
    out = []
    for key, value in values.items():
        out += [key, str(tuple(value)) if isinstance(value, (list, tuple)) else str(value)]
    return out


def _lazy_opts(values: Mapping[str, object]) -> List[str]:
    """INPUT sizes and SOLVER lengths as overrides of the shapes LazyConfigs."""
    names = {
        "INPUT.MIN_SIZE_TRAIN": "dataloader.train.mapper.augmentations.0.short_edge_length",
        "INPUT.MAX_SIZE_TRAIN": "dataloader.train.mapper.augmentations.0.max_size",
        "INPUT.MIN_SIZE_TEST": "dataloader.test.mapper.augmentations.0.short_edge_length",
        "INPUT.MAX_SIZE_TEST": "dataloader.test.mapper.augmentations.0.max_size",
    }
    out = []
    for key, value in values.items():
        if key not in names:
            raise ValueError(f"no LazyConfig override for {key}")
        out.append(f"{names[key]}={list(value) if isinstance(value, tuple) else value}")
    return out


@dataclass
class Plan:
    """What every run of a comparison shares: the data, the recipe's overrides, where outputs go."""

    train: Tuple[str, str]
    val: Tuple[str, str]
    classes: Tuple[str, ...]
    root: str
    opts: Tuple[str, ...] = ()  # overrides of the demo config for every run (the smoke's length)
    lazy_opts: Tuple[str, ...] = ()
    extra: Dict[str, str] = field(default_factory=dict)

    def mmdet_argv(self, detector, seed, out, init=None, anchor_scale=None, input_scale=1.0):
        argv = ["tools/mmdet_train_net.py", "--detector", detector, "--seed", str(seed),
                "--train", f"{self.train[0]}:{self.train[1]}", "--val", f"{self.val[0]}:{self.val[1]}",
                "--output-dir", out]  # fmt: skip
        if init:
            argv += ["--load-from", init]
        if anchor_scale is not None:
            argv += ["--anchor-scale", str(anchor_scale)]
        if input_scale != 1.0:
            argv += ["--input-scale", str(input_scale)]
        return tuple(argv + list(self.opts))

    def d2_argv(self, seed, out, opts=(), weights=""):
        return ("tools/train_net.py", "--config-file", DEMO_CONFIG, *_d2_dataset_args(self.train, self.val),
                "--resume", "SEED", str(seed), "MODEL.WEIGHTS", weights, "DATASETS.TRAIN", "('cmp_train',)",
                "DATASETS.TEST", "('cmp_val',)", "TEST.GALLERY.NUM_IMAGES", "0", "MODEL.VFNET.NUM_CLASSES",
                str(len(self.classes)), *opts, *self.opts, "OUTPUT_DIR", out)  # fmt: skip

    def d2_retinanet_argv(self, seed, out, opts=()):
        return ("tools/train_net.py", "--config-file", RETINANET_CONFIG, *_d2_dataset_args(self.train, self.val),
                "--resume", "SEED", str(seed), "DATASETS.TRAIN", "('cmp_train',)", "DATASETS.TEST",
                "('cmp_val',)", "TEST.GALLERY.NUM_IMAGES", "0", "MODEL.RETINANET.NUM_CLASSES",
                str(len(self.classes)), *opts, *self.opts, "OUTPUT_DIR", out)  # fmt: skip

    def d2_fcos_argv(self, seed, out, lazy_opts=()):
        return ("tools/lazyconfig_train_net.py", "--config-file", FCOS_CONFIG,
                *_d2_dataset_args(self.train, self.val), "--resume", f"train.seed={seed}",
                f"train.output_dir={out}", "dataloader.train.dataset.names=cmp_train",
                "dataloader.test.dataset.names=cmp_val", f"model.num_classes={len(self.classes)}",
                *lazy_opts, *self.lazy_opts)  # fmt: skip

    def init_paths(self, seed: int) -> Tuple[str, str]:
        base = os.path.join(self.root, "init", f"vfnet_mmdet_init_{seed}")
        return base + ".pth", base + "_d2.pth"

    def out(self, study, framework, detector, seed, variant=""):
        tag = "_".join(p for p in (study, framework, detector, variant.replace(" ", ""), str(seed)) if p)
        return os.path.join(self.root, tag.replace("+", "plus_"))


def parity_runs(plan: Plan, seeds: Sequence[int]) -> List[Run]:
    """VFNet in both frameworks, each seed from MMDetection's initialisation of that seed."""
    runs = []
    for s in seeds:
        init_mm, init_d2 = plan.init_paths(s)
        out = plan.out("parity", "mmdet", "VFNet", s)
        runs.append(Run("parity", "mmdet", "VFNet", s, plan.mmdet_argv("VFNet", s, out, init=init_mm), out, init=init_mm))
        out = plan.out("parity", "d2", "VFNet", s)
        runs.append(Run("parity", "detectron2", "VFNet", s, plan.d2_argv(s, out, weights=init_d2), out, init=init_mm))
    return runs


def ordering_runs(plan: Plan, seeds: Sequence[int], table3: bool = True) -> List[Run]:
    """
    MMDetection's FCOS and ATSS (its VFNet: the parity runs), each from its own initialisation;
    Detectron2's FCOS and this project's VFNet with the paper's Table 3 rows (`table3`; else the
    raw VFNet and VFNet only), from Detectron2's initialisation.
    """
    runs = []
    rows = TABLE3_ROWS if table3 else {k: TABLE3_ROWS[k] for k in ("raw", "VFNet")}
    for s in seeds:
        for det in ("FCOS", "ATSS"):
            out = plan.out("ordering", "mmdet", det, s)
            runs.append(Run("ordering", "mmdet", det, s, plan.mmdet_argv(det, s, out), out))
        out = plan.out("ordering", "d2", "FCOS", s)
        runs.append(Run("ordering", "detectron2", "FCOS", s, plan.d2_fcos_argv(s, out), out))
        for row, opts in rows.items():
            out = plan.out("ordering", "d2", row, s)
            runs.append(Run("ordering", "detectron2", row, s, plan.d2_argv(s, out, opts), out))
    return runs


def small_object_runs(plan: Plan, seeds: Sequence[int], study: str = "small", anchor_scales=(8, 6, 4, 3, 2),
                      mmdet_anchor_scales=(8, 4), input_scales=(2.0,), retinanet: bool = True) -> List[Run]:  # fmt: skip
    """
    On a small-object dataset: this project's VFNet at each ATSS anchor scale, and with the
    initial box normalised by the stride instead of 8 x the stride (MODEL.VFNET.BBOX_NORM_TYPE
    "stride"), and resized by OpenCV as MMDetection resizes (INPUT.RESIZE_BACKEND cv2; PIL's
    bilinear, Detectron2's default, smooths when it shrinks), Detectron2's FCOS and RetinaNet (the demo's anchors; `retinanet`), MMDetection's
    VFNet at `mmdet_anchor_scales` and its FCOS; then at each of `input_scales` (x the demo's
    input sizes) VFNet at anchor scales 8 and 4, FCOS and RetinaNet. `study`: the runs' study
    name and output prefix.
    """
    cfg = load_d2_recipe()
    runs = []

    def add(framework, detector, seed, variant, argv_of):
        out = plan.out(study, "d2" if framework == "detectron2" else framework, detector, seed, variant)
        runs.append(Run(study, framework, detector, seed, argv_of(out), out, variant))

    for s in seeds:
        for scale in (1.0, *input_scales):
            sizes = scaled_sizes(cfg, scale) if scale != 1.0 else {}
            tag = f"input x{scale:g}" if scale != 1.0 else ""
            for a in anchor_scales if scale == 1.0 else (8, 4):
                opts = ["MODEL.VFNET.ATSS.ANCHOR_SCALE", str(a), *_yaml_opts(sizes)]
                add("detectron2", "VFNet", s, " ".join(p for p in (f"anchor {a}", tag) if p),
                    lambda out, opts=opts: plan.d2_argv(s, out, opts))  # fmt: skip
            if scale == 1.0:
                add("detectron2", "VFNet", s, "norm stride",
                    lambda out: plan.d2_argv(s, out, ["MODEL.VFNET.BBOX_NORM_TYPE", "stride"]))  # fmt: skip
                add("detectron2", "VFNet", s, "anchor 8 cv2",
                    lambda out: plan.d2_argv(s, out, ["MODEL.VFNET.ATSS.ANCHOR_SCALE", "8", "INPUT.RESIZE_BACKEND", "cv2"]))  # fmt: skip
            add("detectron2", "FCOS", s, tag, lambda out: plan.d2_fcos_argv(s, out, _lazy_opts(sizes)))
            if retinanet:
                add("detectron2", "RetinaNet", s, tag, lambda out: plan.d2_retinanet_argv(s, out, _yaml_opts(sizes)))
            if scale == 1.0:
                for a in mmdet_anchor_scales:
                    add("mmdet", "VFNet", s, f"anchor {a}", lambda out, a=a: plan.mmdet_argv("VFNet", s, out, anchor_scale=a))
                add("mmdet", "FCOS", s, "", lambda out: plan.mmdet_argv("FCOS", s, out))
    return runs


# ----------------------------------------------------------------------------- summary, verdict
def _mean(values):
    return sum(values) / len(values)


def summarize(runs: Sequence[Run]) -> dict:
    """
    The results of `runs` that have finished: one record per run (its study, framework, detector,
    variant, seed, box metrics, loss curve).
    """
    records = []
    for run in runs:
        result = read_result(os.path.join(REPO, run.output_dir)) if not os.path.isabs(run.output_dir) \
            else read_result(run.output_dir)  # fmt: skip
        if result is None:
            continue
        records.append({"study": run.study, "framework": run.framework, "detector": run.detector,
                        "variant": run.variant, "seed": run.seed, "bbox": result["bbox"],
                        "losses": {str(k): v for k, v in result["losses"].items()}})  # fmt: skip
    return {"runs": records}


def last_iterations_mean(losses: Mapping, name: str, last: int = 100) -> float:
    """The mean of loss `name` over the windows that end in the last `last` iterations."""
    iters = sorted(int(k) for k in losses)
    end = iters[-1]
    values = [losses[k if k in losses else str(k)][name] for k in iters if k > end - last]
    return _mean(values)


def verdict(summary: Mapping, study: str = "parity", detector: str = "VFNet") -> List[dict]:
    """
    Whether the two frameworks' runs of `detector` in `study` agree within the seeds' spread:
    for each loss (MMDetection's names, LOSS_NAMES) the mean over seeds of each run's mean over
    its last 100 iterations, and the mean box AP; each pair of framework means may differ by at
    most the larger of the two frameworks' seed spreads (max - min over seeds). One row per
    quantity: {"quantity", "mmdet", "detectron2", "difference", "bound", "agree"}.
    """
    runs = [r for r in summary["runs"] if r["study"] == study and r["detector"] == detector and not r["variant"]]
    by_fw = {fw: [r for r in runs if r["framework"] == fw] for fw in ("mmdet", "detectron2")}
    if not all(by_fw.values()):
        raise ValueError(f"verdict: no {study} runs of {detector} in one of the frameworks")
    quantities = [("AP", lambda r, fw: r["bbox"]["AP"])]
    for mm_name, d2_name in LOSS_NAMES.items():
        quantities.append((mm_name, lambda r, fw, m=mm_name, d=d2_name:
                           last_iterations_mean(r["losses"], m if fw == "mmdet" else d)))  # fmt: skip
    rows = []
    for name, value in quantities:
        values = {fw: [value(r, fw) for r in rs] for fw, rs in by_fw.items()}
        means = {fw: _mean(v) for fw, v in values.items()}
        bound = max(max(v) - min(v) for v in values.values())
        diff = abs(means["mmdet"] - means["detectron2"])
        rows.append({"quantity": name, "mmdet": means["mmdet"], "detectron2": means["detectron2"],
                     "seeds": {fw: v for fw, v in values.items()}, "difference": diff, "bound": bound,
                     "agree": diff <= bound})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- data, tables
# The small-object cases: the shapes demo's generator and image sizes (96-128 px). "small": 1 to 8
# objects per image whose longer box side is 8 px up to 0.156 x the shorter image side (15-20
# px), every box "small" in COCO's sense (area under 32 x 32); "small_12_40": 1 to 6 objects of
# 12 px up to 0.32 x the shorter side (31-41 px).
SMALL_SHAPES_PARAMS = {
    "image_size": (96, 128),
    "min_object_size": 8,
    "max_object_frac": 0.156,
    "max_objects": 8,
    "max_aspect": 2.0,
    "max_rotation": 0.0,
    "max_occlusion": 0.1,
    "max_box_iou": 0.2,
    "empty_prob": 0.0,
    "backgrounds": ("noise", "gradient"),
}
SMALL_OBJECT_SETS = {
    "small": SMALL_SHAPES_PARAMS,
    "small_12_40": dict(SMALL_SHAPES_PARAMS, min_object_size=12, max_object_frac=0.32, max_objects=6),
}


def _spread(values):
    return f"{_mean(values):.1f} ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{values[0]:.1f}"


def format_table(summary: Mapping, study: str) -> str:
    """A Markdown table of `study`'s runs: a row per framework, detector and variant, with the AP
    of each seed, and the mean (min-max) of AP, AP50 and AP75 over the seeds."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in summary["runs"]:
        if r["study"] == study:
            groups.setdefault((r["framework"], r["detector"], r["variant"]), []).append(r)
    lines = ["| framework | detector | variant | AP per seed | AP | AP50 | AP75 |", "|---|---|---|---|---|---|---|"]
    for (fw, det, variant), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        per_seed = ", ".join(f"{r['seed']}: {r['bbox']['AP']:.1f}" for r in rs)
        cells = [_spread([r["bbox"][k] for r in rs]) for k in ("AP", "AP50", "AP75")]
        lines.append(f"| {fw} | {det} | {variant or '-'} | {per_seed} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_verdict(rows: Sequence[Mapping]) -> str:
    lines = ["| quantity | MMDetection | this project | difference | bound (seed spread) | agree |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['quantity']} | {r['mmdet']:.4f} | {r['detectron2']:.4f} | {r['difference']:.4f} "
                     f"| {r['bound']:.4f} | {'yes' if r['agree'] else 'NO'} |")  # fmt: skip
    return "\n".join(lines)


def plot_losses(summary: Mapping, path: str, study: str = "parity", detector: str = "VFNet") -> None:
    """One panel per loss: each seed's curve of both frameworks (median of 20 iterations)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in summary["runs"] if r["study"] == study and r["detector"] == detector and not r["variant"]]
    fig, axes = plt.subplots(1, len(LOSS_NAMES), figsize=(5 * len(LOSS_NAMES), 3.6))
    colours = {"mmdet": "tab:blue", "detectron2": "tab:red"}
    labels = {"mmdet": "MMDetection 3.3", "detectron2": "this project (Detectron2)"}
    for ax, (mm_name, d2_name) in zip(axes, LOSS_NAMES.items()):
        for r in sorted(runs, key=lambda r: (r["framework"], r["seed"])):
            name = mm_name if r["framework"] == "mmdet" else d2_name
            iters = sorted(int(k) for k in r["losses"])
            ax.plot([i + 1 for i in iters], [r["losses"][str(i)][name] for i in iters], color=colours[r["framework"]],
                    lw=1.0, alpha=0.8, label=f"{labels[r['framework']]}" if r["seed"] == min(x["seed"] for x in runs) else None)  # fmt: skip
        ax.set_title(f"{d2_name} ({mm_name})")
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"{detector}: both frameworks, seeds {sorted({r['seed'] for r in runs})}, median of 20 iterations")
    fig.tight_layout()
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=90))
    plt.close(fig)
