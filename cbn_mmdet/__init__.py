"""cbn_mmdet: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for PyTorch and mmdetection 3.x.

The layers need torch only. Where mmengine is installed, importing the package also registers them
and the hooks in the OpenMMLab registries (configs say ``custom_imports =
dict(imports=['cbn_mmdet'], allow_failed_imports=False)``) and applies the compatibility fixes the
stack needs. Every import-time effect is listed in :mod:`cbn_mmdet.openmmlab`.
"""
from . import models, openmmlab
from .models import (BatchRenorm2d, CBNWarning, CrossIterationBatchNorm2d,
                     SyncCrossIterationBatchNorm2d, convert_to_cbn)
from .version import __version__

__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'BatchRenorm2d',
           'convert_to_cbn', 'CBNWarning', '__version__']

openmmlab.setup()
