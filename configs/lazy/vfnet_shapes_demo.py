"""
The embedded demo as a LazyConfig: configs/VFNet_Shapes_Demo.yaml (VFNet with a ResNet-18-FPN of
64 channels trained from scratch on the synthetic shapes dataset, on CPU), on
vfnet_R_50_FPN_1x.py as the YAML is on Base-VFNet.yaml:

    python tools/lazyconfig_train_net.py --config-file configs/lazy/vfnet_shapes_demo.py
"""
import torch
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone import ResNet
from detectron2.solver import get_default_optimizer_params

from .vfnet_R_50_FPN_1x import STRIDES, dataloader, lr_multiplier, model, train

# ResNet-18 with trainable BatchNorm, statistics included, nothing frozen (MODEL.RESNETS.DEPTH 18,
# NORM "BN", BACKBONE.FREEZE_AT 0, NORM_EVAL False: the ResNet without R-50's
# freeze_batchnorm_statistics), FPN and head of 64 channels, 4 classes.
fpn = model.backbone.fpn  # (under xavier_init_fpn, the official neck init)
fpn.bottom_up = fpn.bottom_up.module  # (omegaconf copies the node)
bottom_up = fpn.bottom_up
bottom_up.stem.norm = "BN"
bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
bottom_up.freeze_at = 0
fpn.out_channels = 64
model.head.input_shape = [ShapeSpec(channels=64, stride=s) for s in STRIDES]
model.num_classes = 4
model.pixel_mean = [127.5, 127.5, 127.5]
model.pixel_std = [64.0, 64.0, 64.0]

# The shapes dataset (generated on first use under $DETECTRON2_DATASETS/vfnet_shapes) at the
# images' own scale: 96-128 px images.
dataloader.train.dataset.names = "vfnet_shapes_train"
dataloader.train.mapper.augmentations[0].short_edge_length = (96,)
dataloader.train.mapper.augmentations[0].max_size = 128
dataloader.train.mapper.image_format = "BGR"  # INPUT.FORMAT of the YAML demo (R-50's is RGB)
dataloader.train.total_batch_size = 8
dataloader.train.num_workers = 1
dataloader.test.dataset.names = "vfnet_shapes_val"
dataloader.test.mapper.augmentations[0].short_edge_length = 96
dataloader.test.mapper.augmentations[0].max_size = 128
dataloader.test.num_workers = 1

# AdamW over Detectron2's parameter groups, weight decay 0.05 on all but the norm layers and the
# biases (the YAML's SOLVER.OPTIMIZER "AdamW"); optimizer.params.model is set by the trainer.
optimizer = L(torch.optim.AdamW)(
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0, weight_decay_bias=0.0),
    lr=0.001,
    betas=(0.9, 0.999),
    weight_decay=0.05,
    foreach=True,
)

# 600 iterations: warm-up over 100, lr x0.1 at 480 and 570.
lr_multiplier.scheduler.milestones = [480, 570]
lr_multiplier.scheduler.num_updates = 600
lr_multiplier.warmup_length = 100 / 600

train.output_dir = "output/vfnet_shapes_demo"
train.init_checkpoint = ""
train.max_iter = 600
train.checkpointer.period = 300
train.device = "cpu"
# A fixed seed (initialisation, data order, augmentation): from-scratch runs of this short
# schedule vary by several AP points from seed to seed.
train.seed = 0
# At the end, OUTPUT_DIR/detections.png (16 validation images with their detections) and the
# training curves (TEST.GALLERY.*).
train.gallery = dict(num_images=16, score_thresh=0.3, columns=4)
