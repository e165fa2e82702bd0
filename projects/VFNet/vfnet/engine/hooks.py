"""
Hooks of the project's trainer: stochastic weight averaging (SWA) of the weights at the end of
each epoch of a cyclic-LR phase (Zhang et al., "SWA Object Detection"; the official SWAHook),
and the pictures at the end of a run (a gallery of detections and the training curves).
"""
import itertools
import logging
import os
from typing import Callable, Iterable, Optional

import torch
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, update_bn

from detectron2.engine import HookBase
from detectron2.evaluation.testing import flatten_results_dict
from detectron2.utils import comm

from ..utils.file_io import atomic_write

__all__ = ["Pictures", "StochasticWeightAveraging"]

logger = logging.getLogger(__name__)


def _bare(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


class StochasticWeightAveraging(HookBase):
    """
    The SWA phase of a run: iterations [start_iter, start_iter + epochs x epoch_iters), whose
    learning rate the scheduler cycles (vfnet/solver/lr_scheduler.py). At the first of them the
    optimizer's state (momenta) is reset, as the official SWA phase starts a new optimizer. After
    the last iteration of each of its epochs, the model's weights are added to an equal-weight
    average (:class:`torch.optim.swa_utils.AveragedModel`), which is:

    * written to `save_dir`/model_swa.pth (a Detectron2 checkpoint: "model", "iteration",
      "swa_n_averaged"; replaced atomically, on the main process);
    * evaluated by `eval_function(model)` when given (TEST.EVAL_PERIOD > 0), its results stored
      as the run's metrics with "_swa" added to their first key ("bbox_swa/AP");
    * part of the trainer's checkpoints (this hook's state_dict: the average and its count),
      so that a run resumed within the phase averages the same weights.

    BatchNorm: parameters are averaged, buffers are not. With frozen statistics (FrozenBN, the
    official configs) the model's own are right; BatchNorm layers that train their statistics
    get them recomputed for the averaged weights by :func:`torch.optim.swa_utils.update_bn` over
    `bn_update_iters` batches of `bn_update_loader()` after each averaging (logged), averaged
    over the DDP workers' batches.
    """

    def __init__(
        self,
        start_iter: int,
        epoch_iters: int,
        epochs: int,
        save_dir: str,
        eval_function: Optional[Callable[[torch.nn.Module], dict]] = None,
        bn_update_loader: Optional[Callable[[], Iterable[list]]] = None,
        bn_update_iters: int = 0,
    ):
        self.start_iter = start_iter
        self.epoch_iters = epoch_iters
        self.epochs = epochs
        self.save_dir = save_dir
        self.eval_function = eval_function
        self.bn_update_loader = bn_update_loader
        self.bn_update_iters = bn_update_iters
        self.averaged: Optional[AveragedModel] = None
        self._pending_state = None  # a checkpoint's average, until the model exists

    @property
    def n_averaged(self) -> int:
        return 0 if self.averaged is None else int(self.averaged.n_averaged)

    def _averaged_model(self) -> AveragedModel:
        if self.averaged is None:
            self.averaged = AveragedModel(_bare(self.trainer.model))
            if self._pending_state is not None:
                self.averaged.load_state_dict(self._pending_state)
                self._pending_state = None
        return self.averaged

    def before_step(self):
        if self.trainer.iter == self.start_iter:
            logger.info(
                f"SWA: {self.epochs} epochs of {self.epoch_iters} iterations with a cyclic "
                "learning rate; the optimizer's momenta are reset."
            )
            self.trainer.optimizer.state.clear()

    def after_step(self):
        done = self.trainer.iter + 1 - self.start_iter
        if done <= 0 or done % self.epoch_iters:
            return
        averaged = self._averaged_model()
        averaged.update_parameters(_bare(self.trainer.model))
        epoch = done // self.epoch_iters
        logger.info(
            f"SWA: epoch {epoch}/{self.epochs}: the weights of iteration {self.trainer.iter} "
            f"averaged with the {averaged.n_averaged - 1} before."
        )
        self._update_bn_statistics(averaged)
        self._save(averaged.module)
        if self.eval_function is not None:
            results = self.eval_function(averaged.module)
            if results:
                results = {f"{k}_swa": v for k, v in results.items()}
                self.trainer.storage.put_scalars(
                    **flatten_results_dict(results), smoothing_hint=False
                )
            comm.synchronize()

    def _update_bn_statistics(self, averaged: AveragedModel) -> None:
        norms = [m for m in _bare(self.trainer.model).modules() if isinstance(m, _BatchNorm)]
        trained = [m for m in norms if m.training and m.track_running_stats]
        if not trained:
            return
        if len(trained) != len(norms):
            raise ValueError(
                "SWA: the model has BatchNorm layers that train their statistics and others "
                "that do not; update_bn would reset both. Use one kind."
            )
        if self.bn_update_loader is None:
            raise ValueError("SWA: the model's BatchNorm statistics train, but no loader is given to recompute them.")
        logger.info(
            f"SWA: recomputing the statistics of {len(trained)} BatchNorm layers for the averaged "
            f"weights over {self.bn_update_iters} training batches (torch.optim.swa_utils.update_bn)."
        )
        # update_bn calls model(batch[0]): each Detectron2 batch (a list of dicts) is wrapped.
        batches = itertools.islice(self.bn_update_loader(), self.bn_update_iters)
        update_bn(([batch] for batch in batches), averaged.module)
        if comm.get_world_size() > 1:
            # Each worker saw its own batches: all take the mean over all of them, so that the
            # averaged model is the same on every worker (they evaluate it together).
            for m in averaged.module.modules():
                if isinstance(m, _BatchNorm):
                    for stat in (m.running_mean, m.running_var):
                        torch.distributed.all_reduce(stat)
                        stat /= comm.get_world_size()

    def _save(self, module: torch.nn.Module) -> None:
        if not comm.is_main_process() or not self.save_dir:
            return
        path = os.path.join(self.save_dir, "model_swa.pth")
        data = {
            "model": module.state_dict(),
            "iteration": self.trainer.iter,
            "swa_n_averaged": self.n_averaged,
        }
        logger.info(f"SWA: saving the averaged model to {path}")
        atomic_write(path, lambda f: torch.save(data, f))

    def state_dict(self):
        if self.averaged is None:
            return {} if self._pending_state is None else {"averaged": self._pending_state}
        return {"averaged": self.averaged.state_dict()}

    def load_state_dict(self, state_dict):
        self.averaged = None
        self._pending_state = state_dict.get("averaged")


class Pictures(HookBase):
    """
    At the end of a completed training (main process): `write_gallery(model)`, a picture of the model's
    detections on validation images, and the training curves of OUTPUT_DIR/metrics.json
    (vfnet/utils/plot_metrics.py) into `output_dir`; then log the last evaluation's box AP and
    the pictures' paths, as the run's last lines. Registered after the writers, which complete
    metrics.json when training ends.
    """

    def __init__(self, output_dir: str, write_gallery: Callable[[torch.nn.Module], str], results: Callable[[], dict]):
        self.output_dir = output_dir
        self.write_gallery = write_gallery
        self.results = results

    def after_train(self):
        # Detectron2's trainer ends with iter == max_iter only when training completed; after an
        # exception (a non-finite loss, ...) there is no model to show.
        if not comm.is_main_process() or self.trainer.iter < self.trainer.max_iter:
            return
        from ..utils.plot_metrics import plot_metrics

        paths = [self.write_gallery(_bare(self.trainer.model))]
        paths += sorted(plot_metrics(self.output_dir))
        for name, res in (self.results() or {}).items():
            if isinstance(res, dict) and "AP" in res:
                logger.info(f"{name}: AP {res['AP']:.1f}, AP50 {res['AP50']:.1f}, AP75 {res['AP75']:.1f}")
        logger.info("Pictures: " + ", ".join(os.path.abspath(p) for p in paths))
