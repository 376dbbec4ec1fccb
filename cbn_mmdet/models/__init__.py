"""Normalization layers and their registration in the OpenMMLab registries.

``CBN`` is registered in mmengine's root ``MODELS`` registry, where mmcv registers ``BN``/``SyncBN``/
``GN``, so ``build_norm_layer(dict(type='CBN', ...), C)`` resolves with or without the ``mmdet`` scope.
"""
from mmengine.registry import MODELS

from . import iteration_clock
from .brn import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .conv_binding import BindStatus, ConvBinding, find_conv_producer

MODELS.register_module('CBN', module=CrossIterationBatchNorm2d)
MODELS.register_module('BRN', module=BatchRenorm2d)

__all__ = ['CrossIterationBatchNorm2d', 'BatchRenorm2d', 'BindStatus', 'ConvBinding',
           'find_conv_producer', 'iteration_clock']
