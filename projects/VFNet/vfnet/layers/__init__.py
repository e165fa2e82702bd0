"""
Operators with no model knowledge. They import no Detectron2 (the Detectron2 kernel of
`DeformConv2d` is imported when it runs).
"""
from .batch_norm import FrozenStatsBatchNorm2d, freeze_batchnorm_statistics
from .deform_conv import (
    DEFORM_CONV_IMPLS,
    DeformConv2d,
    deform_conv2d_by_gather,
    deform_conv2d_by_sampling,
    finite_offsets,
)
from .narrow_input_conv import NarrowInputConv2d, convolve_narrow_inputs_in_float32
from .soft_nms import SOFT_NMS_METHODS, batched_soft_nms, soft_nms
