"""
The deformable convolutions of an exported graph: the kernel each one traces in ("sampling":
GridSample + MatMul; "torchvision": ONNX DeformConv, opset 19, through the symbolic registered
here), and the check that none runs an untraceable kernel (Detectron2's CUDA one).
"""
from typing import Optional

import torch
from torch import nn


from ..layers.deform_conv import DeformConv2d


# GridSample (the "sampling" deformable convs) is in ONNX from opset 16; 17 is the newest opset
# most runtimes support fully.
DEFAULT_ONNX_OPSET = 17
# ONNX DeformConv (the "torchvision" deformable convs) is in ONNX from opset 19.
DEFORM_CONV_ONNX_OPSET = 19
EXPORTABLE_DEFORM_CONV_IMPLS = ("sampling", "torchvision")


def set_deform_conv_impl(model: nn.Module, impl: str) -> int:
    """
    Make every deformable conv of the VFNet head of `model` run the kernel `impl` ("sampling" or
    "torchvision": the weights are the same tensors for all kernels). The deformable convs of a
    DCN backbone trace as torchvision's on the CPU.

    Returns:
        the number of deformable convs changed.
    """
    if impl not in EXPORTABLE_DEFORM_CONV_IMPLS:
        raise ValueError(f"Cannot export deformable convs '{impl}': use one of {EXPORTABLE_DEFORM_CONV_IMPLS}.")
    layers = [m for m in model.modules() if isinstance(m, DeformConv2d)]
    for m in layers:
        m.impl = impl
    return len(layers)


def deform_conv_impls(model: nn.Module, device: Optional[torch.device] = None) -> set:
    """
    The kernels the deformable convs of `model` run on `device` (default: the model's): those of
    the head ("gather", "sampling", "torchvision", "detectron2"), and of the backbone's DCN stages
    (MODEL.RESNETS.DEFORM_ON_PER_STAGE): torchvision's on CPU, Detectron2's on GPU.
    """
    from detectron2.layers import DeformConv, ModulatedDeformConv

    from ..modeling.backbone.resnet_fpn import AnyDeviceDeformConv, AnyDeviceModulatedDeformConv

    if device is None:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
    cuda = torch.device(device).type == "cuda"
    impls = set()
    for m in model.modules():
        if isinstance(m, DeformConv2d):
            impls.add(m.resolved_impl(device))
        elif isinstance(m, (AnyDeviceDeformConv, AnyDeviceModulatedDeformConv)):
            impls.add("detectron2" if cuda else "torchvision")
        elif isinstance(m, (DeformConv, ModulatedDeformConv)):
            impls.add("detectron2")
    return impls


def check_exportable(model: nn.Module) -> set:
    impls = deform_conv_impls(model)
    bad = impls - set(EXPORTABLE_DEFORM_CONV_IMPLS)
    if bad:
        raise ValueError(
            f"The model's deformable convs run {sorted(bad)}, which cannot be traced: set "
            "MODEL.VFNET.DEFORM_CONV_IMPL to 'sampling' or 'torchvision' (or call "
            "vfnet.export.set_deform_conv_impl) before exporting; a backbone with deformable "
            "convs (MODEL.RESNETS.DEFORM_ON_PER_STAGE) traces on the CPU only (MODEL.DEVICE cpu), "
            "with torchvision's kernel."
        )
    return impls


def _deform_conv2d_symbolic(
    g, input, weight, offset, mask, bias,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups, use_mask,
):  # fmt: skip
    """
    torchvision::deform_conv2d -> ONNX DeformConv (opset 19). Both take the offsets in the same
    layout, (N, offset_groups * kH * kW * 2, oH, oW) with (dy, dx) pairs, and the mask as
    (N, offset_groups * kH * kW, oH, oW); torchvision passes a zero bias when there is none.
    """
    from torch.onnx import symbolic_helper

    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups = (
        symbolic_helper._get_const(v, "i", name)
        for v, name in zip(
            (stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, groups, offset_groups),
            ("stride_h", "stride_w", "pad_h", "pad_w", "dilation_h", "dilation_w", "groups", "offset_groups"),
        )
    )
    use_mask = symbolic_helper._get_const(use_mask, "b", "use_mask")
    inputs = [input, weight, offset, bias]
    if use_mask:
        inputs.append(mask)
    return g.op(
        "DeformConv",
        *inputs,
        dilations_i=[dilation_h, dilation_w],
        group_i=groups,
        offset_group_i=offset_groups,
        pads_i=[pad_h, pad_w, pad_h, pad_w],
        strides_i=[stride_h, stride_w],
    )


def register_deform_conv_onnx_symbolic(opset_version: int = DEFORM_CONV_ONNX_OPSET) -> None:
    """
    Register the ONNX symbolic of ``torchvision::deform_conv2d`` (ONNX DeformConv) with
    PyTorch's TorchScript-based ONNX exporter, for `opset_version` (>= 19) and above.
    Torchvision registers symbolics for nms and roi_align only.
    """
    if opset_version < DEFORM_CONV_ONNX_OPSET:
        raise ValueError(
            f"ONNX DeformConv needs opset >= {DEFORM_CONV_ONNX_OPSET}, got {opset_version}."
        )
    torch.onnx.register_custom_op_symbolic(
        "torchvision::deform_conv2d", _deform_conv2d_symbolic, opset_version
    )


def deform_conv_onnx_translation_table() -> dict:
    """
    The same mapping for PyTorch's torch.export-based exporter: pass it as
    ``torch.onnx.export(..., dynamo=True, opset_version=19, custom_translation_table=...)``.
    For graphs torch.export can capture, e.g. the backbone and head without Detectron2's
    post-processing (see the module docstring); needs `onnxscript`.
    """
    from onnxscript import opset19 as op

    def deform_conv2d(
        input,
        weight,
        offset,
        mask,
        bias,
        stride_h: int,
        stride_w: int,
        pad_h: int,
        pad_w: int,
        dilation_h: int,
        dilation_w: int,
        groups: int,
        offset_groups: int,
        use_mask: bool,
    ):
        attrs = dict(
            dilations=[dilation_h, dilation_w],
            group=groups,
            offset_group=offset_groups,
            pads=[pad_h, pad_w, pad_h, pad_w],
            strides=[stride_h, stride_w],
        )
        if use_mask:
            return op.DeformConv(input, weight, offset, bias, mask, **attrs)
        return op.DeformConv(input, weight, offset, bias, **attrs)

    return {torch.ops.torchvision.deform_conv2d.default: deform_conv2d}
