"""
BatchNorm with frozen running statistics and a trainable affine: MMDetection's backbone norm
(``BN(requires_grad=True)`` with ``norm_eval=True``), as a layer and a module-tree conversion.
"""
from torch import nn


class FrozenStatsBatchNorm2d(nn.BatchNorm2d):
    """
    BatchNorm2d that is always in eval mode: it normalises with its running statistics, never
    updates them, and `train()` leaves it in eval mode; weight and bias keep `requires_grad` and
    train. Its state dict is BatchNorm2d's.
    """

    def train(self, mode: bool = True):
        return super().train(False)


def freeze_batchnorm_statistics(module: nn.Module) -> nn.Module:
    """
    Make every BatchNorm2d and SyncBatchNorm of `module` (subclasses such as Detectron2's
    NaiveSyncBatchNorm, and `module` itself, included) a FrozenStatsBatchNorm2d in place: the
    same parameters and buffers, another class. Other modules (FrozenBatchNorm2d, GroupNorm,
    ...) are left as they are. For any bottom-up backbone builder. Returns `module`.
    """
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            m.__class__ = FrozenStatsBatchNorm2d
            m.train(False)
    return module
