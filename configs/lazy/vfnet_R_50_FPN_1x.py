"""
VarifocalNet R-50 1x as a LazyConfig: the model, data, optimizer and schedule of
configs/VFNet_R_50_FPN_1x.yaml (with configs/Base-VFNet.yaml; the reasons for each value are
written there), in the sections of Detectron2's configs/common (model, dataloader, optimizer,
lr_multiplier, train), for tools/lazyconfig_train_net.py:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/vfnet_R_50_FPN_1x.py --num-gpus 8

tests/engine/test_lazy_config.py checks that it builds the YAML config's model (same parameters,
buffers and outputs), optimizer groups and learning rates.
"""
import torch
from fvcore.common.param_scheduler import MultiStepParamScheduler
from omegaconf import OmegaConf

import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone import FPN, BasicStem, ResNet
from detectron2.modeling.backbone.fpn import LastLevelP6P7
from detectron2.solver import WarmupParamScheduler

from vfnet.data.build import build_resumable_train_loader
from vfnet.data.detection_utils import get_detection_dataset_dicts_as_mmdet
from vfnet.data.mapper import VFNetDatasetMapper
from vfnet.evaluation import VFNetCOCOEvaluator
from vfnet.layers import freeze_batchnorm_statistics
from vfnet.modeling.backbone.resnet_fpn import xavier_init_fpn
from vfnet.modeling.atss import ATSSMatcher
from vfnet.modeling.meta_arch.vfnet import VFNet
from vfnet.modeling.vfnet_head import VFNetHead
from vfnet.solver import get_mmdet_optimizer_params

# The strides of P3-P7.
STRIDES = [8, 16, 32, 64, 128]

# VFNet's __init__ takes its parts, as Detectron2's RetinaNet and FCOS do: the ResNet-FPN of
# build_vfnet_resnet_fpn_backbone (P6 from the P5 output), the VFNet head (MODEL.VFNET.* of
# vfnet/config.py, under their lower-case names), ATSS with one square anchor of 8 x stride per
# location (MODEL.VFNET.ATSS.ANCHOR_SCALE 8, TOPK 9), the losses and the inference settings.
model = L(VFNet)(
    # The official neck's init (xavier-uniform) over Detectron2's FPN, as the YAML configs.
    backbone=L(xavier_init_fpn)(fpn=L(FPN)(
        # BN with frozen statistics and trained affine (MODEL.BACKBONE.NORM_EVAL, official
        # norm_eval); stem and res2 frozen (FrozenBN). Pytorch style (stride in the 3x3 conv),
        # as torchvision's ImageNet ResNet-50 of the official config.
        bottom_up=L(freeze_batchnorm_statistics)(
            module=L(ResNet)(
                stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
                stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=False, norm="BN"),
                out_features=["res3", "res4", "res5"],
                freeze_at=2,
            )
        ),
        in_features=["res3", "res4", "res5"],
        out_channels=256,
        top_block=L(LastLevelP6P7)(
            in_channels="${..out_channels}", out_channels="${..out_channels}", in_feature="p5"
        ),
    )),
    head=L(VFNetHead)(
        # The FPN's outputs p3-p7: its channels and strides.
        input_shape=[ShapeSpec(channels=256, stride=s) for s in STRIDES],
        num_classes="${..num_classes}",
        num_convs=3,
        norm="GN",
        bbox_norm_type="reg_denom",
        gradient_mul=0.1,
        dcn_on_last_conv=False,
        use_star_dcn=True,
        use_refine=True,
        prior_prob=0.01,
        deform_conv_impl="auto",
    ),
    head_in_features=["p3", "p4", "p5", "p6", "p7"],
    anchor_generator=L(DefaultAnchorGenerator)(
        sizes=[[8 * s] for s in STRIDES], aspect_ratios=[1.0], strides=STRIDES, offset=0.0
    ),
    anchor_matcher=L(ATSSMatcher)(topk=9, size_divisor=32),
    num_classes=80,
    cls_loss_type="varifocal",
    vfl_alpha=0.75,
    vfl_gamma=2.0,
    iou_weighted=True,
    focal_alpha=0.25,
    focal_gamma=2.0,
    qfl_beta=2.0,
    loss_bbox_weight=1.5,
    loss_bbox_refine_weight=2.0,
    test_score_thresh=0.05,
    test_topk_candidates=1000,
    test_nms_thresh=0.6,
    max_detections_per_image=100,
    # torchvision's ImageNet normalisation (RGB), as the official config.
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
)

dataloader = OmegaConf.create()
# The project's resumable loader (vfnet/data/build.py): the batches of a resumed run are those
# the interrupted run would have read; the data seed is train.seed.
dataloader.train = L(build_resumable_train_loader)(
    # MMDetection's training-set filter, as DATALOADER.TRAIN_FILTER "mmdet" of the YAML configs.
    dataset=L(get_detection_dataset_dicts_as_mmdet)(names="coco_2017_train", min_size=32),
    mapper=L(VFNetDatasetMapper)(
        is_train=True,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=(800,), max_size=1333, sample_style="choice"),
            L(T.RandomFlip)(horizontal=True),
        ],
        image_format="RGB",
        load_truncated_images=False,
    ),
    total_batch_size=16,
    seed="${train.seed}",
    aspect_ratio_grouping=True,
    num_workers=4,
)
dataloader.test = L(build_detection_test_loader)(
    dataset=L(get_detection_dataset_dicts)(names="coco_2017_val", filter_empty=False),
    mapper=L(VFNetDatasetMapper)(
        is_train=False,
        augmentations=[
            L(T.ResizeShortestEdge)(short_edge_length=800, max_size=1333, sample_style="choice"),
        ],
        image_format="${...train.mapper.image_format}",
        load_truncated_images="${...train.mapper.load_truncated_images}",
    ),
    num_workers=4,
)
dataloader.evaluator = L(VFNetCOCOEvaluator)(
    dataset_name="${..test.dataset.names}",
    output_dir="${train.output_dir}/inference",
)

# SGD over the official (mmcv's) parameter groups (SOLVER.PARAM_GROUPS "mmdet"): the biases of
# the convs and linear layers lr x2 and no weight decay; the norm layers, the deformable convs'
# offset convs and the head's scales the base lr and decay. optimizer.params.model is set to the
# model by the trainer.
optimizer = L(torch.optim.SGD)(
    params=L(get_mmdet_optimizer_params)(
        base_lr="${..lr}",
        weight_decay="${..weight_decay}",
        weight_decay_norm="${..weight_decay}",
        bias_lr_factor=2.0,
        weight_decay_bias=0.0,
    ),
    lr=0.01,
    momentum=0.9,
    nesterov=False,
    weight_decay=1e-4,
    foreach=True,
)

# Detectron2's WarmupMultiStepLR of SOLVER.*: linear warm-up from 0.1 x lr over 500 iterations,
# lr x0.1 at 58,640 and 80,630 (after epochs 8 and 11) of 87,960. As in Detectron2's lazy
# configs, the schedule is a function of the fraction of train.max_iter done: overriding
# train.max_iter alone stretches or shrinks it (warm-up and steps included).
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[58640, 80630], num_updates=87960
    ),
    warmup_length=500 / 87960,
    warmup_method="linear",
    warmup_factor=0.1,
)

# Detectron2's configs/common/train.py, with its seed (SEED, read by Detectron2's default_setup
# and the training loader; negative: random) and this config's values.
train = dict(
    output_dir="output/vfnet_R_50_FPN_1x",
    # torchvision's ImageNet ResNet-50, downloaded and converted on first use.
    init_checkpoint="vfnet://ImageNetPretrained/resnet50",
    max_iter=87960,
    # AMP (Detectron2's key) and its dtype, as SOLVER.AMP.DTYPE: "auto" is float16 on CUDA,
    # bfloat16 on CPU.
    amp=dict(enabled=False, dtype="auto"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,  # 0: at the end only (TEST.EVAL_PERIOD)
    log_period=20,
    device="cuda",
    seed=-1,
)
