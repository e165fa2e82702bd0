"""Meta-architectures registered with Detectron2's META_ARCH_REGISTRY."""
from .iou_aware_dense import IoUAwareFCOS, IoUAwareRetinaNet
from .vfnet import VFNet
