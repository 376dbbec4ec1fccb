"""cbn_mmdet: Cross-Iteration Batch Normalization (Yao et al., CVPR 2021) for mmdetection 3.x.

Importing the package registers everything it provides into the OpenMMLab registries (configs say
``custom_imports = dict(imports=['cbn_mmdet'], allow_failed_imports=False)``) and applies the
compatibility fixes the stack needs on current torch (see :mod:`cbn_mmdet.compat`).
"""
from . import compat  # noqa: F401  (first: patches must be in place before anything loads checkpoints)
from . import datasets  # noqa: F401
from . import models  # noqa: F401
from . import engine  # noqa: F401

__version__ = '0.1.0'
