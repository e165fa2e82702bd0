"""
Checkpoints that a run killed while saving cannot leave half-written under a name that
`--resume` or `--eval-only` reads, loading that names the file at fault, and MMDetection
checkpoints (files and addresses) loaded as they are, converted on load.
"""

import os
from typing import Mapping
from urllib.parse import urlparse

import torch

from detectron2.checkpoint import DetectionCheckpointer

from ..utils.file_io import atomic_write
from .converter import load_checkpoint
from .mmdet_checkpoint import convert_mmdet_checkpoint, converted_download, misfit_of, mmdet_kind

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

    An MMDetection checkpoint (a VarifocalNet or RetinaNet, or the ImageNet backbone of an
    official config; a file, an http(s) address or a ``vfnet://`` name) is converted as it is
    loaded (:mod:`~vfnet.checkpoint.mmdet_checkpoint`; a download's conversion is cached beside it)
    and refused, naming it, unless it fits the model as tools/convert_mmdet_to_d2.py --config-file
    requires: no weight missing, unexpected or in another shape. A file that is neither
    Detectron2's nor MMDetection's is refused too.
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
        if path and path.startswith(("http://", "https://", "ftp://")):
            address, _, query = path.partition("?")
            path = converted_download(address) + (f"?{query}" if query else "")
        try:
            return super().load(path, *args, **kwargs)
        finally:
            self._loading = None

    def _torch_load(self, f):
        try:
            checkpoint = load_checkpoint(f)
        except Exception as e:  # torch.load raises many types for a file it cannot read
            raise CheckpointError(
                f"Cannot read checkpoint '{f}': it is not a PyTorch checkpoint, or it is "
                f"truncated ({type(e).__name__}: {e})."
            ) from e
        kind = mmdet_kind(checkpoint)
        if kind is not None:
            self.logger.info(f"Converting the MMDetection checkpoint {f} ({kind}) ...")
            return convert_mmdet_checkpoint(checkpoint, kind, f)
        if not self._is_detectron2s(checkpoint):
            keys = list(checkpoint)[:5] if isinstance(checkpoint, Mapping) else []
            raise CheckpointError(
                f"Checkpoint '{self._loading}'"
                + ("" if f == self._loading else f" (file '{f}')")
                + " is neither a Detectron2 checkpoint (no 'model' entry, and none of its keys "
                "is a weight of the model) nor an MMDetection checkpoint (no 'state_dict' entry, "
                f"no key 'bbox_head.*' or 'neck.*', nor an ImageNet ResNet's): it holds a "
                f"{type(checkpoint).__name__}" + (f" of keys {keys} ..." if keys else "") + "."
            )
        return checkpoint

    def _is_detectron2s(self, checkpoint) -> bool:
        """Whether a loaded file is a Detectron2 checkpoint: {"model": ...}, or a state dict of
        the model (that of a DistributedDataParallel too)."""
        if not isinstance(checkpoint, Mapping):
            return False
        weights = self.model.state_dict()
        return "model" in checkpoint or any(
            k.removeprefix("module.") in weights for k in checkpoint
        )

    def _load_model(self, checkpoint):
        converted = "converted_from" in checkpoint
        if converted:  # an MMDetection checkpoint: its fit is the converter's (BN counters aside)
            problems = misfit_of(checkpoint, self.model.state_dict())
            kind = checkpoint.pop("converted_from")["kind"]
            if problems:
                shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
                raise CheckpointError(
                    f"Checkpoint '{self._loading}', an MMDetection checkpoint ({kind}) converted "
                    f"on load, does not fit the model ({len(problems)} problem(s)):\n  {shown}\n"
                    "Is it the checkpoint of this config (for the official models, the config of "
                    "configs/mmdet/ of the same name)? To fine-tune it with other classes, convert "
                    "it with tools/convert_mmdet_to_d2.py and load the converted file."
                )
        incompatible = super()._load_model(checkpoint)
        if self.strict and not converted and incompatible.missing_keys:
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
