"""
The optimizer of the official VarifocalNet: SGD over MMDetection's parameter groups.

The official configs build SGD with mmcv's ``DefaultOptimizerConstructor`` and
``paramwise_cfg=dict(bias_lr_mult=2., bias_decay_mult=0.)`` (mmcv 1.2-1.3,
mmcv/runner/optimizer/default_constructor.py, ``add_params``). Its rule, per parameter of a
module (the parameter's own name, not recursing):

* a parameter of a norm layer (BatchNorm and SyncBatchNorm, InstanceNorm, GroupNorm,
  LayerNorm), weight or bias: the base lr, weight decay x ``norm_decay_mult`` (unset: x1);
* a parameter of the offset conv of a deformable conv (``conv_offset`` inside mmcv's
  ``ModulatedDeformConv2dPack``), weight or bias: lr x ``dcn_offset_lr_mult`` (unset: x1), the
  base weight decay;
* a parameter of a depthwise conv (``in_channels == groups``): weight decay x
  ``dwconv_decay_mult`` (unset: x1), which precedes ``bias_decay_mult``; its bias still gets
  ``bias_lr_mult``;
* any other parameter named ``bias`` (convs, deformable convs, linear layers): lr x
  ``bias_lr_mult``, weight decay x ``bias_decay_mult``;
* everything else (conv weights, the head's per-level ``Scale`` parameters): the base lr and
  weight decay.

Detectron2's ``get_default_optimizer_params`` instead gives ``BIAS_LR_FACTOR`` and
``WEIGHT_DECAY_BIAS`` to every parameter named ``bias``, the norm layers' biases included (their
decay then is WEIGHT_DECAY_BIAS, not WEIGHT_DECAY_NORM), and to the offset convs' biases.
``SOLVER.PARAM_GROUPS`` picks one or the other (vfnet/config.py).
"""
from typing import Any, Dict, List, Optional, Set

import torch
from detectron2.layers import DeformConv, ModulatedDeformConv
from detectron2.solver.build import (
    get_default_optimizer_params,
    maybe_add_gradient_clipping,
    reduce_param_groups,
)
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from ..layers.deform_conv import DeformConv2d

__all__ = ["build_optimizer", "get_mmdet_optimizer_params"]

# mmcv's norm layers (_BatchNorm covers SyncBatchNorm and Detectron2's NaiveSyncBatchNorm).
# FrozenBatchNorm2d has no parameters.
NORM_TYPES = (_BatchNorm, _InstanceNorm, nn.GroupNorm, nn.LayerNorm)
DEFORM_CONV_TYPES = (DeformConv, ModulatedDeformConv, DeformConv2d)


def deform_offset_convs(model: nn.Module) -> Set[nn.Module]:
    """
    The convs that predict the offsets of a deformable conv. In mmcv's modules such a conv is
    the ``conv_offset`` child of the deformable conv; in this project's it is the deformable
    conv's sibling: Detectron2's ``DeformBottleneckBlock.conv2_offset`` beside ``conv2``, and
    ``ModulatedDeformConvBlock.conv_offset`` beside ``conv`` in the head (see
    vfnet/checkpoint/converter.py). Both layouts are found: a conv whose name ends in "offset",
    child of a deformable conv or of a module that has a deformable conv as a child.
    """
    found = set()
    for module in model.modules():
        children = dict(module.named_children())
        holds_deform_conv = isinstance(module, DEFORM_CONV_TYPES) or any(
            isinstance(child, DEFORM_CONV_TYPES) for child in children.values()
        )
        if not holds_deform_conv:
            continue
        for name, child in children.items():
            if name.endswith("offset") and isinstance(child, nn.Conv2d):
                found.add(child)
    return found


def get_mmdet_optimizer_params(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: Optional[float] = None,
    bias_lr_factor: float = 1.0,
    weight_decay_bias: Optional[float] = None,
) -> List[Dict[str, Any]]:
    """
    The parameter groups of mmcv's ``DefaultOptimizerConstructor`` (see the module's
    docstring), in the terms of Detectron2's ``get_default_optimizer_params``:
    ``bias_lr_factor`` is mmcv's ``bias_lr_mult``, ``weight_decay_bias`` is ``base_wd x
    bias_decay_mult`` and ``weight_decay_norm`` is ``base_wd x norm_decay_mult`` (None: the base
    weight decay, as mmcv's unset multipliers). mmcv's ``dcn_offset_lr_mult`` and
    ``dwconv_decay_mult``, which the official configs leave unset, are 1. As Detectron2's, it
    leaves out the parameters that do not require a gradient, lists a shared parameter once,
    and merges the parameters of equal settings into one group.
    """
    wd_norm = weight_decay if weight_decay_norm is None else weight_decay_norm
    wd_bias = weight_decay if weight_decay_bias is None else weight_decay_bias
    offset_convs = deform_offset_convs(model)
    params: List[Dict[str, Any]] = []
    memo: Set[nn.Parameter] = set()
    for module in model.modules():
        is_norm = isinstance(module, NORM_TYPES)
        is_offset_conv = module in offset_convs
        is_dwconv = isinstance(module, nn.Conv2d) and module.in_channels == module.groups
        for name, value in module.named_parameters(recurse=False):
            if not value.requires_grad or value in memo:
                continue
            memo.add(value)
            lr, wd = base_lr, weight_decay
            is_bias = name == "bias" and not (is_norm or is_offset_conv)
            if is_bias:
                lr = base_lr * bias_lr_factor
            if is_norm:
                wd = wd_norm
            elif is_dwconv:
                wd = weight_decay  # mmcv's dwconv_decay_mult, unset (x1)
            elif is_bias:
                wd = wd_bias
            params.append({"params": [value], "lr": lr, "weight_decay": wd})
    return reduce_param_groups(params)


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """
    The optimizer SOLVER.OPTIMIZER names over the parameter groups of SOLVER.PARAM_GROUPS,
    with SOLVER.CLIP_GRADIENTS as Detectron2's ``build_optimizer`` adds it:

    * "SGD": as Detectron2's ``build_optimizer`` builds it (SOLVER.BASE_LR, MOMENTUM, NESTEROV,
      WEIGHT_DECAY);
    * "AdamW": ``torch.optim.AdamW`` (SOLVER.BASE_LR, BETAS, WEIGHT_DECAY), as Detectron2's
      LazyConfigs build it (e.g. its ViTDet configs).

    SOLVER.PARAM_GROUPS: "mmdet" (:func:`get_mmdet_optimizer_params`, the official
    VarifocalNet's) or "detectron2" (Detectron2's ``get_default_optimizer_params``).
    """
    style = cfg.SOLVER.PARAM_GROUPS
    group_builders = {"mmdet": get_mmdet_optimizer_params, "detectron2": get_default_optimizer_params}
    if style not in group_builders:
        raise ValueError(f'SOLVER.PARAM_GROUPS is "{style}": use "mmdet" or "detectron2".')
    name = cfg.SOLVER.OPTIMIZER
    if name not in ("SGD", "AdamW"):
        raise ValueError(f'SOLVER.OPTIMIZER is "{name}": use "SGD" or "AdamW".')
    params = group_builders[style](
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    if name == "SGD":
        optimizer_type, extra = torch.optim.SGD, dict(
            momentum=cfg.SOLVER.MOMENTUM, nesterov=cfg.SOLVER.NESTEROV
        )
    else:
        optimizer_type, extra = torch.optim.AdamW, dict(betas=tuple(cfg.SOLVER.BETAS))
    optimizer = optimizer_type(
        params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY, foreach=True, **extra
    )
    return maybe_add_gradient_clipping(cfg, optimizer)
