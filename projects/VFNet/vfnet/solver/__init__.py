from .build import build_optimizer, get_mmdet_optimizer_params

__all__ = ["build_optimizer", "get_mmdet_optimizer_params"]
