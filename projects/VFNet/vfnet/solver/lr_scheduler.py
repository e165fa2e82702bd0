"""
The learning-rate schedule of a run: Detectron2's (SOLVER.LR_SCHEDULER_NAME, warm-up, steps) over
SOLVER.MAX_ITER iterations, followed, with SOLVER.SWA.ENABLED, by the cyclic schedule of the SWA
phase (Zhang et al., "SWA Object Detection"; the official `swa_lr_config`: mmcv's cyclic policy,
`target_ratio=(1, 0.01)`, `step_ratio_up=0`, one cycle per epoch).
"""
import logging
import math
from typing import NamedTuple, Tuple

import torch
from fvcore.common.param_scheduler import (
    CompositeParamScheduler,
    CosineParamScheduler,
    ParamScheduler,
)

from detectron2.config import CfgNode
from detectron2.data import get_detection_dataset_dicts
from detectron2.solver import LRMultiplier
from detectron2.solver import build_lr_scheduler as build_detectron2_lr_scheduler

__all__ = ["SWASchedule", "build_lr_scheduler", "swa_cyclic_multiplier", "swa_schedule"]


class SWASchedule(NamedTuple):
    """Where the SWA phase lies in a run's iterations."""

    start_iter: int  # the first iteration of the SWA phase (SOLVER.MAX_ITER)
    epoch_iters: int  # iterations per SWA epoch; the weights are averaged after each
    epochs: int

    @property
    def max_iter(self) -> int:
        """The run's number of iterations: the normal schedule, then the SWA epochs."""
        return self.start_iter + self.epochs * self.epoch_iters


def swa_schedule(cfg: CfgNode) -> SWASchedule:
    """
    The SWA phase of `cfg` (SOLVER.SWA.*), or an empty one when SWA is off. SOLVER.SWA.EPOCH_ITERS
    0 counts an epoch as the training images (after Detectron2's filtering) divided by
    SOLVER.IMS_PER_BATCH, rounded up, as MMDetection's epoch-based runner does.
    """
    swa = cfg.SOLVER.SWA
    if not swa.ENABLED:
        return SWASchedule(cfg.SOLVER.MAX_ITER, 0, 0)
    if swa.EPOCHS < 1:
        raise ValueError(f"SOLVER.SWA.EPOCHS must be at least 1 with SOLVER.SWA.ENABLED, got {swa.EPOCHS}.")
    epoch_iters = swa.EPOCH_ITERS
    if epoch_iters < 0:
        raise ValueError(f"SOLVER.SWA.EPOCH_ITERS must be 0 (one pass over DATASETS.TRAIN) or more, got {epoch_iters}.")
    if epoch_iters == 0:
        images = len(
            get_detection_dataset_dicts(
                cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
            )
        )
        epoch_iters = math.ceil(images / cfg.SOLVER.IMS_PER_BATCH)
        logging.getLogger(__name__).info(
            f"SWA: an epoch of {images} training images at SOLVER.IMS_PER_BATCH "
            f"{cfg.SOLVER.IMS_PER_BATCH} is {epoch_iters} iterations (SOLVER.SWA.EPOCH_ITERS 0)."
        )
    return SWASchedule(cfg.SOLVER.MAX_ITER, epoch_iters, swa.EPOCHS)


def swa_cyclic_multiplier(epochs: int, lr_factors: Tuple[float, float]) -> ParamScheduler:
    """
    The LR multiplier of an SWA phase of `epochs` epochs, over where = [0, 1): in each epoch a
    cosine from lr_factors[0] down to lr_factors[1]. At the i-th iteration of an epoch of L
    iterations it is mmcv's cyclic value with step_ratio_up 0,
    ``end + (start - end) * (1 + cos(pi * i / L)) / 2``.
    """
    start, end = lr_factors
    return CompositeParamScheduler(
        [CosineParamScheduler(start, end)] * epochs,
        lengths=[1.0 / epochs] * epochs,
        interval_scaling=["rescaled"] * epochs,
    )


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> LRMultiplier:
    """
    Detectron2's LR scheduler of `cfg` (SOLVER.*) over SOLVER.MAX_ITER iterations; with
    SOLVER.SWA.ENABLED, followed by :func:`swa_cyclic_multiplier` (SOLVER.SWA.LR_FACTORS, relative
    to each parameter group's normal learning rate) over the SWA epochs. SOLVER.MAX_ITER 0 runs
    only the SWA phase (from MODEL.WEIGHTS, as the official `only_swa_training`).
    """
    schedule = swa_schedule(cfg)
    if schedule.epochs == 0:
        return build_detectron2_lr_scheduler(cfg, optimizer)
    swa = swa_cyclic_multiplier(schedule.epochs, tuple(cfg.SOLVER.SWA.LR_FACTORS))
    if schedule.start_iter == 0:
        return LRMultiplier(optimizer, multiplier=swa, max_iter=schedule.max_iter)
    # Detectron2's schedule (warm-up, steps) is rebuilt from cfg as its own scheduler holds it.
    normal = build_detectron2_lr_scheduler(cfg, optimizer)._multiplier
    share = schedule.start_iter / schedule.max_iter
    multiplier = CompositeParamScheduler(
        [normal, swa], lengths=[share, 1.0 - share], interval_scaling=["rescaled", "rescaled"]
    )
    return LRMultiplier(optimizer, multiplier=multiplier, max_iter=schedule.max_iter)
