"""
Checkpoints that a run killed while saving cannot leave half-written under a name that
`--resume` or `--eval-only` reads, and loading that names the file at fault.
"""

import os
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.file_io import atomic_write

__all__ = ["CheckpointError", "VFNetCheckpointer", "load_for_evaluation"]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


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
