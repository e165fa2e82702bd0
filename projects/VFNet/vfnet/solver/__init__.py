"""The optimizer and learning-rate schedules of the project's trainer."""
from .build import build_optimizer, get_mmdet_optimizer_params
from .lr_scheduler import SWASchedule, build_lr_scheduler, swa_cyclic_multiplier, swa_schedule

__all__ = [
    "SWASchedule",
    "build_lr_scheduler",
    "build_optimizer",
    "get_mmdet_optimizer_params",
    "swa_cyclic_multiplier",
    "swa_schedule",
]
