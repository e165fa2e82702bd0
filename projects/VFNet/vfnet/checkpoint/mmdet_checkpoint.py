"""
MMDetection checkpoints as Detectron2 weights (``MODEL.WEIGHTS``): a loaded file is recognised by
its keys (an MMDetection VarifocalNet or RetinaNet, ``{"state_dict": ...}`` or bare, or the
ImageNet backbone of an official config) and converted by this package's converters.

A download's conversion is cached beside it, ``<download>.d2-v1.pth``, and made once: the first
process to take its lock (iopath's ``file_lock``, as iopath's own downloads) converts and writes it
atomically, the others wait, then read it. A conversion is a function of the file alone (renamed
tensors, stacked scales, permuted channels: no config enters it), so the cache is keyed by the
download and the converter: it is made again when the download is newer than it (downloaded again)
or when the converter's version (in its name) changes. Whether it fits the model is checked at each
load, against the model being loaded (:func:`misfit_of`).
"""
import logging
import os
from typing import Dict, List, Mapping, Optional

from iopath.common.file_io import file_lock

from detectron2.utils.file_io import PathManager

from .converter import (
    BACKBONE_OFFSET_CONV,
    ConversionError,
    convert_imagenet_backbone,
    convert_mmdet_to_d2,
    detectron2_checkpoint,
    extract_state_dict,
    imagenet_backbone,
    load_checkpoint,
    misfit,
    save_converted,
)
from .retinanet_converter import RETINANET_MARKER_KEY, convert_retinanet_mmdet_to_d2

__all__ = ["CONVERTED_SUFFIX", "convert_mmdet_checkpoint", "converted_download", "misfit_of", "mmdet_kind"]

# Raised when a conversion rule changes: the conversions of an older converter are made again.
CONVERTER_VERSION = 1
CONVERTED_SUFFIX = f".d2-v{CONVERTER_VERSION}.pth"

# kind -> (conversion of its state dict, the prefix of the model's keys it must hold, the model's
# keys left to its initialisation), as tools/convert_mmdet_to_d2.py checks with --config-file.
CONVERSIONS = {
    "vfnet": (convert_mmdet_to_d2, "", None),
    "retinanet": (convert_retinanet_mmdet_to_d2, "", None),
    "imagenet": (convert_imagenet_backbone, "backbone.bottom_up.", BACKBONE_OFFSET_CONV),
}

logger = logging.getLogger(__name__)


def mmdet_kind(checkpoint) -> Optional[str]:
    """
    The MMDetection checkpoint a loaded file holds, by its keys: "retinanet" (a RetinaHead),
    "vfnet" (another MMDetection detector: ``{"state_dict": ...}``, or keys ``neck.*`` /
    ``bbox_head.*``; its conversion refuses one that is not a VarifocalNet, saying what it has),
    "imagenet" (an official config's ImageNet ResNet, ResNeXt or Res2Net), or None: not
    MMDetection's (a Detectron2 checkpoint, ``{"model": ...}`` or bare, or something else).
    """
    if not isinstance(checkpoint, Mapping) or "model" in checkpoint:
        return None
    state_dict = checkpoint.get("state_dict", checkpoint)
    keys = set(state_dict) if isinstance(state_dict, Mapping) else set()
    if RETINANET_MARKER_KEY in keys:
        return "retinanet"
    if "state_dict" in checkpoint or any(k.startswith(("neck.", "bbox_head.")) for k in keys):
        return "vfnet"
    return "imagenet" if imagenet_backbone(keys) else None


def convert_mmdet_checkpoint(checkpoint, kind: str, name: str) -> Dict[str, object]:
    """
    The Detectron2 checkpoint of the loaded MMDetection checkpoint `checkpoint` of `kind`
    (:func:`mmdet_kind`) read from `name`, with ``{"kind", "file"}`` under "converted_from".

    Raises:
        ConversionError: it cannot be converted (the message names `name` and the key at fault).
    """
    try:
        converted, _ = CONVERSIONS[kind][0](extract_state_dict(checkpoint))
    except ConversionError as e:
        raise ConversionError(f"{name}: {e}") from None
    return detectron2_checkpoint(converted, converted_from={"kind": kind, "file": name})


def misfit_of(checkpoint: Mapping, model_state_dict: Mapping) -> List[str]:
    """
    The problems of the weights of a converted checkpoint (:func:`convert_mmdet_checkpoint`)
    against a model's state dict, as tools/convert_mmdet_to_d2.py --config-file finds them: a
    detector's must be the model's every weight; an ImageNet backbone's, its bottom-up's (the DCN
    offsets left to their initialisation).
    """
    _, prefix, model_init = CONVERSIONS[checkpoint["converted_from"]["kind"]]
    return misfit(checkpoint["model"], model_state_dict, prefix, model_init)


def converted_download(url: str, **kwargs) -> str:
    """
    The local file to load for the weights at the address `url`, downloaded once into
    PathManager's cache (`kwargs`: its get_local_path's, e.g. ``cache_dir``): the download itself,
    or for an MMDetection checkpoint its conversion, cached beside it (see the module's docstring).

    Raises:
        OSError: the download fails (the message names `url`).
        ConversionError: the download cannot be read (it is then removed, so that the next load
            downloads it again) or converted.
    """
    try:
        download = PathManager.get_local_path(url, **kwargs)
    except OSError as e:
        raise OSError(f"Cannot download '{url}': {e}") from e
    if download.endswith((".pkl", ".pyth")):  # Detectron2's formats of other frameworks
        return download
    cache = download + CONVERTED_SUFFIX
    with file_lock(cache):
        if os.path.isfile(cache) and os.stat(cache).st_mtime_ns >= os.stat(download).st_mtime_ns:
            logger.info(f"{url}: the conversion cached in {cache}")
            return cache
        try:
            checkpoint = load_checkpoint(download)
        except Exception as e:  # torch.load raises many types for a file it cannot read
            os.remove(download)
            raise ConversionError(
                f"Cannot read the checkpoint downloaded from '{url}' to '{download}': it is not a "
                f"PyTorch checkpoint, or it is truncated ({type(e).__name__}: {e}). The download "
                "is removed: the next load downloads it again."
            ) from e
        kind = mmdet_kind(checkpoint)
        if kind is None:
            return download
        converted = convert_mmdet_checkpoint(checkpoint, kind, url)
        save_converted(converted["model"], cache, converted_from=converted["converted_from"])
        logger.info(f"Converted the MMDetection checkpoint {url} ({kind}) into {cache}")
    return cache
