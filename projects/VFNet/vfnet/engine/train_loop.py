"""
Detectron2's SimpleTrainer and AMPTrainer, whose check of the losses stops every DDP worker and
says where a non-finite value first appeared; a trainer for CPU bf16 autocast
(:class:`CPUAutocastTrainer`), and :func:`build_trainer`, which picks one for SOLVER.AMP.*
(train.amp.*).

Detectron2's trainer checks the losses once per step, after the backward and before the
optimizer step: `write_metrics` reads each worker's losses (one host synchronisation) and
gathers them to the main process (one collective), which raises when their sum is not finite;
the other workers go on into the next step's gradient all-reduce and wait there. These trainers
gather the losses to every worker instead (the same one collective), so that every worker
raises, and only then, on the workers whose losses are not finite, run the model's
`locate_non_finite` on the step's batch: when everything is finite a step costs nothing more
than Detectron2's.
"""
import logging
import math
import time
from typing import Dict, List, Mapping, Optional

import numpy as np
import torch

from detectron2.engine import train_loop
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from ..layers import convolve_narrow_inputs_in_float32

__all__ = [
    "AMPTrainer",
    "CPUAutocastTrainer",
    "NonFiniteLossError",
    "SimpleTrainer",
    "build_trainer",
    "has_native_bf16",
]

logger = logging.getLogger(__name__)

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


# The CPU features of native bfloat16 arithmetic, as torch.cpu.get_capabilities() (and lscpu)
# name them: x86 AVX-512 BF16 and AMX, ARM's BF16 extension.
NATIVE_BF16_FEATURES = ("avx512_bf16", "amx_bf16", "bf16")
# What bf16 autocast costs without native bf16 (the warning of CPUAutocastTrainer): measured on
# an AMD EPYC (Zen 4) with torch and oneDNN limited to AVX2 as on Zen 2 (ATEN_CPU_CAPABILITY=avx2,
# ONEDNN_MAX_CPU_ISA=AVX2), 2 threads, a 256-channel 3x3 convolution of 2 x 32 x 48.
EMULATED_BF16_MEASURED = (
    "measured where torch is limited to AVX2, as on AMD Zen 2: a 3x3 convolution's forward 40x "
    "and backward 4x slower than in float32"
)


def has_native_bf16(capabilities: Optional[Mapping] = None) -> bool:
    """Whether the CPU (`capabilities`, default torch.cpu.get_capabilities()) computes bfloat16
    natively; without it torch emulates bf16 autocast in float32, slower than float32 itself."""
    capabilities = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return any(capabilities.get(f, False) for f in NATIVE_BF16_FEATURES)


class CPUAutocastTrainer(SimpleTrainer):
    """
    :class:`SimpleTrainer` whose forward (model and losses) runs under
    ``torch.autocast("cpu", dtype=precision)``, as Detectron2's AMPTrainer does on CUDA: the
    convolutions and matrix products in bfloat16 (AMX / AVX-512 BF16 units), the parameters,
    their gradients and the optimizer's state in float32 (autocast casts a copy of each weight
    for its op; the gradient flows back to the float32 parameter), and what the model keeps in
    float32 (VFNet: box decoding, ATSS, the losses, the deformable convs' sampling positions).

    No loss scaling: bfloat16 has float32's 8-bit exponent, so a gradient underflows only below
    float32's own smallest normal (1e-38), where float16 (5-bit exponent) loses everything under
    6e-8 and needs Detectron2's GradScaler. On a CPU without native bf16 (:func:`has_native_bf16`)
    the trainer logs a warning: there it is slower than float32.

    The strided nn.Conv2d of the model become :class:`vfnet.layers.NarrowInputConv2d` (in place,
    same parameters): oneDNN's bf16 weight gradient of an input narrower than the stride is wrong
    (P6 and P7 of an FPN on images at most 64 px wide), so those inputs are convolved in float32.
    """

    def __init__(self, model, data_loader, optimizer, precision: torch.dtype = torch.bfloat16, **kwargs):
        """
        Args:
            model, data_loader, optimizer, kwargs: as Detectron2's SimpleTrainer.
            precision: the dtype of autocast (torch.bfloat16).
        """
        super().__init__(model, data_loader, optimizer, **kwargs)
        convolve_narrow_inputs_in_float32(model)
        self.precision = precision
        if precision == torch.bfloat16 and not has_native_bf16():
            logger.warning(
                "Training under bf16 autocast on a CPU without native bf16 (none of "
                f"{', '.join(NATIVE_BF16_FEATURES)} in torch.cpu.get_capabilities(), as lscpu "
                f"names them): torch emulates bf16, slower than float32 ({EMULATED_BF16_MEASURED}). "
                "SOLVER.AMP.ENABLED False (train.amp.enabled=False) trains in float32."
            )
        logger.info(f"Training under torch.autocast('cpu', dtype={precision}).")

    def run_step(self):
        """Detectron2's AMPTrainer.run_step on CPU: autocast around the forward, no GradScaler."""
        assert self.model.training, "[CPUAutocastTrainer] model was changed to eval mode!"
        start = time.perf_counter()
        data = next(self._data_loader_iter)
        data_time = time.perf_counter() - start

        if self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        with torch.autocast("cpu", dtype=self.precision):
            loss_dict = self.model(data)
            if isinstance(loss_dict, torch.Tensor):
                losses = loss_dict
                loss_dict = {"total_loss": loss_dict}
            else:
                losses = sum(loss_dict.values())
        if not self.zero_grad_before_forward:
            self.optimizer.zero_grad()
        losses.backward()
        self.after_backward()
        if self.async_write_metrics:
            self.concurrent_executor.submit(self._write_metrics, loss_dict, data_time, iter=self.iter)
        else:
            self._write_metrics(loss_dict, data_time)
        self.optimizer.step()


AMP_DTYPES = ("auto", "bfloat16", "float16")


def amp_dtype(dtype: str, device: str, key: str = "SOLVER.AMP.DTYPE") -> torch.dtype:
    """
    The autocast dtype of AMP training on `device` for the config value `dtype` (of the config
    key `key`): "auto" is float16 on CUDA (Detectron2's AMPTrainer) and bfloat16 on CPU.
    """
    if dtype not in AMP_DTYPES:
        raise ValueError(f"{key} must be one of {AMP_DTYPES}, got '{dtype}'.")
    device = torch.device(device).type
    if dtype == "auto":
        return torch.float16 if device == "cuda" else torch.bfloat16
    if dtype == "float16" and device != "cuda":
        raise ValueError(
            f"{key} is 'float16', which trains on CUDA only (with Detectron2's GradScaler); "
            f"on {device} use 'bfloat16' (or 'auto')."
        )
    return getattr(torch, dtype)


def build_trainer(
    model, data_loader, optimizer, device: str, amp: bool = False, dtype: str = "auto",
    key: str = "SOLVER.AMP.DTYPE",
):  # fmt: skip
    """
    The train loop of SOLVER.AMP.ENABLED (`amp`) and SOLVER.AMP.DTYPE (`dtype`, the config key
    `key`) for a model on `device`: :class:`SimpleTrainer` without AMP; with it,
    :class:`CPUAutocastTrainer` on CPU (bfloat16), Detectron2's :class:`AMPTrainer` on CUDA
    (float16 with its GradScaler, or bfloat16, which needs no loss scaling).
    """
    if not amp:
        return SimpleTrainer(model, data_loader, optimizer)
    precision = amp_dtype(dtype, device, key)
    if torch.device(device).type == "cpu":
        return CPUAutocastTrainer(model, data_loader, optimizer, precision=precision)
    scaler = None if precision == torch.float16 else torch.amp.GradScaler("cuda", enabled=False)
    return AMPTrainer(model, data_loader, optimizer, grad_scaler=scaler, precision=precision)
