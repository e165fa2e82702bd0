"""
fcos_shapes_demo.py (Detectron2's FCOS, focal loss) trained with the varifocal loss instead
(vfnet.modeling.meta_arch.IoUAwareFCOS): the target of a positive location at its class is the
IoU of its decoded predicted box with its ground truth; alpha 0.75, gamma 2, IoU-weighted
positives, as the official VFL configs. FCOS's centerness branch is kept (trained and multiplied
into the scores), as the official ATSS + VFL head keeps its own. Everything else is the
focal-loss demo's.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/fcos_vfl_shapes_demo.py
"""
from vfnet.modeling.meta_arch import IoUAwareFCOS

from .fcos_shapes_demo import dataloader, lr_multiplier, model, optimizer, train

model._target_ = IoUAwareFCOS
model.cls_loss_type = "varifocal"
model.vfl_alpha = 0.75
model.vfl_gamma = 2.0
model.vfl_iou_weighted = True

train.output_dir = "output/fcos_vfl_shapes_demo"
