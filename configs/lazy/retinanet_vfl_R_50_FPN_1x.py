"""
Detectron2's RetinaNet R-50-FPN (its configs/common/models/retinanet.py) trained with the
varifocal loss (vfnet.modeling.meta_arch.IoUAwareRetinaNet), the recipe of
configs/RetinaNet_VFL_R_50_FPN_1x.yaml (the official vfl_retinanet_r50_fpn_4x4_1x_coco.py; the
reasons are written there): L1 box loss, VFL alpha 0.75 gamma 2, SGD lr 0.01 with one group
(lr and weight decay 1e-4 on every parameter), the data and 1x schedule of vfnet_R_50_FPN_1x.py.

    python tools/lazyconfig_train_net.py \
        --config-file configs/lazy/retinanet_vfl_R_50_FPN_1x.py --num-gpus 8

The focal-loss baseline: model.cls_loss_type=focal; GFL's QFL: model.cls_loss_type=quality_focal.
"""
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.solver import get_default_optimizer_params

from vfnet.modeling.meta_arch import IoUAwareRetinaNet

from .vfnet_R_50_FPN_1x import dataloader, lr_multiplier, optimizer, train

model = model_zoo.get_config("common/models/retinanet.py").model
model._target_ = IoUAwareRetinaNet
model.backbone.bottom_up.freeze_at = 2
model.smooth_l1_beta = 0.0  # L1
model.cls_loss_type = "varifocal"
model.vfl_alpha = 0.75
model.vfl_gamma = 2.0
model.vfl_iou_weighted = True

optimizer.params = L(get_default_optimizer_params)()  # the optimizer's lr and weight decay for all

train.output_dir = "output/retinanet_vfl_R_50_FPN_1x"
train.init_checkpoint = "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
# The MSRA weights read BGR (Detectron2's RetinaNet pixel mean); VFNet R-50's loader reads RGB.
dataloader.train.mapper.image_format = "BGR"
