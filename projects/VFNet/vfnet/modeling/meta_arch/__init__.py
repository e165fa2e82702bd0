"""Meta-architectures registered with Detectron2's META_ARCH_REGISTRY."""
from .vfnet import VFNet
