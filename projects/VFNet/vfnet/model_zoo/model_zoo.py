"""
Detectron2's model zoo functions for this project's configs: the repository's ``configs/``, which
setup.py links into this package as ``configs`` (as Detectron2's setup.py does its own), found
with importlib.resources; and the official weights of the ``configs/mmdet/`` configs.
"""
import importlib.resources
import os
from typing import Optional

import torch

from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate
from detectron2.modeling import build_model

from ..checkpoint.catalog import ModelCatalog
from ..checkpoint.detection_checkpoint import VFNetCheckpointer
from ..config import add_vfnet_config

__all__ = ["get_checkpoint_url", "get", "get_config_file", "get_config"]

# The configs that evaluate official weights: mmdet/<name>.yaml, <name> in ModelCatalog.
OFFICIAL_CONFIGS = "mmdet/"


def get_checkpoint_url(config_path: str) -> str:
    """
    The download address of the official weights of a config.

    Args:
        config_path: a config file name relative to this project's ``configs/``, e.g.
            "mmdet/VFNet_R_50_FPN_1x.yaml".

    Raises:
        RuntimeError: the config has no official weights, or they are only on a sharing page
            (the message names the page and how to load them).
    """
    name = os.path.splitext(config_path)[0]
    if name.startswith(OFFICIAL_CONFIGS) and config_path.endswith(".yaml"):
        return ModelCatalog.get(name[len(OFFICIAL_CONFIGS) :])
    hint = ""
    if name in ModelCatalog.URLS or name in ModelCatalog.SHARING_PAGES:
        hint = f" The official {name} is evaluated with {OFFICIAL_CONFIGS}{name}.yaml."
    raise RuntimeError(
        f"No official weights for {config_path}: those of configs/{OFFICIAL_CONFIGS}*.yaml are "
        f"the official models.{hint}"
    )


def get_config_file(config_path: str) -> str:
    """
    The path of a config of this project.

    Args:
        config_path: a config file name relative to this project's ``configs/``, e.g.
            "mmdet/VFNet_R_50_FPN_1x.yaml" or "lazy/vfnet_shapes_demo.py".

    Returns:
        the config file's path in the installed package.
    """
    cfg_file = importlib.resources.files(__package__) / "configs" / config_path
    if not cfg_file.is_file():
        raise RuntimeError(
            f"{config_path} is not available in the model zoo (no {cfg_file}; the package's "
            "configs are made by its install: pip install .)."
        )
    return str(cfg_file)


def get_config(config_path: str, trained: bool = False):
    """
    The config of a config file of this project.

    Args:
        config_path: see :func:`get_config_file`.
        trained: set ``MODEL.WEIGHTS`` to the official weights (:func:`get_checkpoint_url`)
            instead of those of the config (for a training config, its ImageNet backbone).

    Returns:
        CfgNode (a YAML config, with this project's keys) or omegaconf.DictConfig (a LazyConfig).
    """
    weights = get_checkpoint_url(config_path) if trained else None  # YAML configs only
    cfg_file = get_config_file(config_path)
    if cfg_file.endswith(".py"):
        return LazyConfig.load(cfg_file)
    cfg = get_cfg()
    add_vfnet_config(cfg)
    cfg.merge_from_file(cfg_file)
    if trained:
        cfg.MODEL.WEIGHTS = weights
    return cfg


def get(config_path: str, trained: bool = False, device: Optional[str] = None):
    """
    The model of a config of this project, with its weights loaded by
    :class:`~vfnet.checkpoint.detection_checkpoint.VFNetCheckpointer` (an official MMDetection
    checkpoint downloaded and converted once, and with `trained` checked to fit every weight).

    Args:
        config_path: see :func:`get_config_file`.
        trained: see :func:`get_config`.
        device: the model's device ("cpu", "cuda"); by default the config's, or "cpu" without
            CUDA.

    Returns:
        nn.Module: the model, in training mode (as Detectron2's ``model_zoo.get``).

    Example::

        from vfnet import model_zoo
        model = model_zoo.get("mmdet/VFNet_R_50_FPN_1x.yaml", trained=True)
    """
    cfg = get_config(config_path, trained)
    if device is None and not torch.cuda.is_available():
        device = "cpu"
    if isinstance(cfg, CfgNode):
        if device is not None:
            cfg.MODEL.DEVICE = device
        model = build_model(cfg)
        VFNetCheckpointer(model, strict=trained).load(cfg.MODEL.WEIGHTS)
        return model
    model = instantiate(cfg.model)
    if device is not None:
        model = model.to(device)
    if "train" in cfg and "init_checkpoint" in cfg.train:
        VFNetCheckpointer(model).load(cfg.train.init_checkpoint)
    return model
