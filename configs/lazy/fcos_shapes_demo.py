"""
Detectron2's own FCOS (detectron2.modeling.meta_arch.fcos.FCOS, as its
configs/COCO-Detection/fcos_R_50_FPN_1x.py builds it) on the demo of vfnet_shapes_demo.py, for a
side-by-side comparison with VFNet: the same backbone (ResNet-18 with BatchNorm from scratch,
FPN P3-P7 of 64 channels, P6 from P5 as FCOS has it), pixel mean and std, data, input sizes,
schedule, optimizer (AdamW, lr 0.001) and seed.

    python tools/lazyconfig_train_net.py --config-file configs/lazy/fcos_shapes_demo.py

Adapted from Detectron2's FCOS config, besides the backbone: num_classes 4, and the head's input
shape and conv widths, 64 (Detectron2's are its FPN's 256: the head is as wide as the FPN, as
the VFNet and RetinaNet demos' heads are). Nothing else: its center sampling, focal loss,
GIoU loss, centerness, GN head, score threshold 0.2 and NMS 0.6 are FCOS's defaults, and learn
this data.
"""
from detectron2 import model_zoo
from detectron2.layers import ShapeSpec

from .vfnet_shapes_demo import dataloader, lr_multiplier, optimizer, train
from .vfnet_shapes_demo import model as vfnet_model

model = model_zoo.get_config("COCO-Detection/fcos_R_50_FPN_1x.py").model
model.backbone = vfnet_model.backbone.fpn  # Detectron2's FPN init (VFNet's: xavier_init_fpn)
model.num_classes = 4
model.head.input_shape = [ShapeSpec(channels=64)] * 5
model.head.conv_dims = [64] * 4
model.pixel_mean = vfnet_model.pixel_mean
model.pixel_std = vfnet_model.pixel_std

train.output_dir = "output/fcos_shapes_demo"
