"""
Detectron2's SimpleTrainer and AMPTrainer, whose check of the losses stops every DDP worker and
says where a non-finite value first appeared.

Detectron2's trainer checks the losses once per step, after the backward and before the
optimizer step: `write_metrics` reads each worker's losses (one host synchronisation) and
gathers them to the main process (one collective), which raises when their sum is not finite;
the other workers go on into the next step's gradient all-reduce and wait there. These trainers
gather the losses to every worker instead (the same one collective), so that every worker
raises, and only then, on the workers whose losses are not finite, run the model's
`locate_non_finite` on the step's batch: when everything is finite a step costs nothing more
than Detectron2's.
"""
import math
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from detectron2.engine import train_loop
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

__all__ = ["AMPTrainer", "NonFiniteLossError", "SimpleTrainer"]

ADVICE = (
    "Training diverged (lower SOLVER.BASE_LR, lengthen SOLVER.WARMUP_ITERS, or set "
    "SOLVER.CLIP_GRADIENTS.ENABLED True), or a batch holds a non-finite input; --resume "
    "continues from the last checkpoint."
)


class NonFiniteLossError(FloatingPointError):
    """
    A training loss that is NaN or infinite. `image` is the index in the batch of the image where
    the non-finite value first appears, when it is one image's (None otherwise).
    """

    def __init__(self, message: str, image: Optional[int] = None):
        super().__init__(message)
        self.image = image


class _LastBatch:
    """An iterator over a data loader's batches that keeps the last one (`last`)."""

    def __init__(self, iterator):
        self._iterator = iterator
        self.last = None

    def __iter__(self):
        return self

    def __next__(self):
        self.last = next(self._iterator)
        return self.last


def non_finite_error(
    all_losses: List[Dict[str, float]], rank: int, iteration: int, batch: Optional[list], model
) -> NonFiniteLossError:
    """
    The error of worker `rank` when the losses of some workers (`all_losses`, per worker) are not
    finite: on a worker whose losses are, which workers' are not; on one whose are not, the
    losses and where the value first appeared (`model.locate_non_finite(batch)` ->
    (description, image index), when the model has it), with the image's file name.
    """
    bad = [r for r, losses in enumerate(all_losses) if not all(map(math.isfinite, losses.values()))]
    if rank not in bad:
        return NonFiniteLossError(
            f"The batch of worker(s) {bad} became non-finite at iteration {iteration}; "
            f"this worker's is finite. {ADVICE}"
        )
    losses = all_losses[rank]
    names = [k for k, v in losses.items() if not math.isfinite(v)]
    listing = ", ".join(f"{k} {v:.4g}" for k, v in losses.items())
    where, image = "the losses", None
    locate = getattr(model, "locate_non_finite", None)
    if locate is not None and batch is not None:
        where, image = locate(batch)
    what = (
        f"The input of iteration {iteration}"
        if where.startswith(("the pixels", "a ground-truth box"))
        else f"Loss {' and '.join(names)} became {losses[names[0]]} at iteration {iteration} "
        f"({listing})"
    )
    message = f"{what}: it first appears in {where}"
    if image is not None:
        message += f" of image {image} of the batch"
    message += f". {ADVICE}"
    if image is not None:
        record = batch[image]
        message += (
            f" The image: '{record.get('file_name', '(no file name)')}' (image id "
            f"{record.get('image_id')})."
        )
    return NonFiniteLossError(message, image)


class _NonFiniteCheck:
    """The check of the losses of :mod:`this module <vfnet.engine.train_loop>`, for a
    Detectron2 SimpleTrainer or AMPTrainer."""

    @property
    def _data_loader_iter(self):
        if self._data_loader_iter_obj is None:
            self._data_loader_iter_obj = _LastBatch(iter(self.data_loader))
        return self._data_loader_iter_obj

    def _write_metrics(
        self,
        loss_dict: Mapping[str, torch.Tensor],
        data_time: float,
        prefix: str = "",
        iter: Optional[int] = None,
    ) -> None:
        iter = self.iter if iter is None else iter
        if (iter + 1) % self.gather_metric_period:
            return
        losses = {k: v.detach().cpu().item() for k, v in loss_dict.items()}
        all_losses = comm.all_gather(dict(losses, data_time=data_time))
        data_times = [x.pop("data_time") for x in all_losses]
        if not all(math.isfinite(v) for x in all_losses for v in x.values()):
            model = getattr(self.model, "module", self.model)  # DDP
            batch = getattr(self._data_loader_iter_obj, "last", None)
            raise non_finite_error(all_losses, comm.get_rank(), iter, batch, model)
        # What Detectron2's write_metrics records, from the losses gathered above.
        storage = get_event_storage()
        storage.put_scalar("rank_data_time", data_time, cur_iter=iter)
        if comm.is_main_process():
            storage.put_scalar("data_time", np.max(data_times), cur_iter=iter)
            means = {k: np.mean([x[k] for x in all_losses]) for k in all_losses[0]}
            storage.put_scalar(f"{prefix}total_loss", sum(means.values()), cur_iter=iter)
            if len(means) > 1:
                storage.put_scalars(cur_iter=iter, **means)


class SimpleTrainer(_NonFiniteCheck, train_loop.SimpleTrainer):
    """Detectron2's SimpleTrainer with the check of the losses of this module."""


class AMPTrainer(_NonFiniteCheck, train_loop.AMPTrainer):
    """Detectron2's AMPTrainer with the check of the losses of this module."""
