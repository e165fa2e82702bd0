"""
fcos_shapes_demo.py trained with GFL's quality focal loss (beta 2) on the IoU-aware targets of
fcos_vfl_shapes_demo.py: the comparison of the varifocal loss.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/fcos_qfl_shapes_demo.py
"""
from .fcos_vfl_shapes_demo import dataloader, lr_multiplier, model, optimizer, train

model.cls_loss_type = "quality_focal"
model.qfl_beta = 2.0

train.output_dir = "output/fcos_qfl_shapes_demo"
