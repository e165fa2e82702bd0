"""
Checkpoints that a run killed while saving cannot leave half-written under a name that
`--resume` or `--eval-only` reads, and loading that names the file at fault.
"""

import errno
import os
import shutil
from typing import Callable, IO
from urllib.parse import urlparse
import torch

from detectron2.checkpoint import DetectionCheckpointer

__all__ = ["CheckpointError", "VFNetCheckpointer", "atomic_write", "load_for_evaluation"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """
    Call `write` on a binary file that becomes `path` only once complete: it is written to
    `path + ".tmp"` in the same directory, flushed to disk, then renamed (atomically on POSIX).
    """
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = os.path.getsize(tmp) if os.path.exists(tmp) else 0
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            folder = os.path.dirname(os.path.abspath(path))
            free = shutil.disk_usage(folder).free
            raise OSError(
                e.errno,
                f"Cannot write '{path}': no space left on its disk (or quota) after "
                f"{written / 2**20:.1f} MiB; {free / 2**20:.1f} MiB are free in '{folder}'. "
                f"'{path}' and the files written before are as they were (the partial file is "
                "removed). Free space, or give another OUTPUT_DIR, then go on with --resume.",
            ) from e
        raise


class VFNetCheckpointer(DetectionCheckpointer):
    """
    DetectionCheckpointer that writes each checkpoint and the `last_checkpoint` tag with
    :func:`atomic_write` (in a local `save_dir`): a run killed while saving leaves the previous
    checkpoint and tag as they were, and at most a `*.tmp` file, which nothing reads.

    Loading a local file that does not exist or is not a checkpoint raises an error naming it;
    with `strict`, so does loading one that lacks weights of the model or has them in another
    shape (Detectron2 only warns, as a fine-tuning from a backbone's weights expects).
    """

    def __init__(self, model, save_dir="", *, strict: bool = False, **kwargs):
        super().__init__(model, save_dir, **kwargs)
        self.strict = strict
        self._loading = None

    def save(self, name: str, **kwargs) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info(f"Saving checkpoint to {save_file}")
        atomic_write(save_file, lambda f: torch.save(data, f))
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        path = os.path.join(self.save_dir, "last_checkpoint")
        atomic_write(path, lambda f: f.write(last_filename_basename.encode()))

    def load(self, path, *args, **kwargs):
        if path and "://" not in path and not os.path.isfile(urlparse(path).path):
            raise FileNotFoundError(f"Checkpoint '{path}' does not exist.")
        self._loading = path
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _torch_load(self, f):
        try:
            return super()._torch_load(f)
        except Exception as e:  # torch.load raises many types for a file it cannot read
            raise CheckpointError(
                f"Cannot read checkpoint '{f}': it is not a PyTorch checkpoint, or it is "
                f"truncated ({type(e).__name__}: {e})."
            ) from e

    def _load_model(self, checkpoint):
        incompatible = super()._load_model(checkpoint)
        if self.strict and incompatible.missing_keys:
            shapes = {key: (ckpt, model) for key, ckpt, model in incompatible.incorrect_shapes}
            missing = [k for k in incompatible.missing_keys if k not in shapes]
            problems = [
                f"{key} has shape {tuple(ckpt)} in the checkpoint, {tuple(model)} in the model"
                for key, (ckpt, model) in shapes.items()
            ]
            if missing:
                shown = ", ".join(missing[:5]) + (", ..." if len(missing) > 5 else "")
                problems.append(f"{len(missing)} weights of the model are not in it ({shown})")
            raise CheckpointError(
                f"Checkpoint '{self._loading}' does not fit the model: {'; '.join(problems)}. "
                "Is it a model trained with this config (MODEL.VFNET.NUM_CLASSES, "
                "MODEL.RESNETS.DEPTH, ...)?"
            )
        return incompatible


def load_for_evaluation(
    model, weights: str, save_dir: str, resume: bool = False, weights_key: str = "MODEL.WEIGHTS"
) -> None:
    """
    Load the weights to evaluate into `model`: with `resume`, the last checkpoint of `save_dir`
    if there is one, else `weights` (MODEL.WEIGHTS, or the config key `weights_key`: a lazy
    config's train.init_checkpoint). Refuse, rather than evaluate an untrained model, when there
    are none, or when they do not fit the model.
    """
    checkpointer = VFNetCheckpointer(model, save_dir, strict=True)
    path = (
        checkpointer.get_checkpoint_file() if resume and checkpointer.has_checkpoint() else weights
    )
    if not path:
        raise CheckpointError(
            f"No weights to evaluate: {weights_key} is empty"
            + (f" and OUTPUT_DIR '{save_dir}' has no last_checkpoint" if resume else "")
            + f". Set {weights_key} to a trained checkpoint, e.g. OUTPUT_DIR/model_final.pth."
        )
    checkpointer.load(path, checkpointables=[])
