"""The optimizer and learning-rate schedules of the project's trainer."""
from .lr_scheduler import build_lr_scheduler, swa_cyclic_multiplier, swa_schedule
