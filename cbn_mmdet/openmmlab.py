"""Everything ``import cbn_mmdet`` does to the OpenMMLab stack, in one place.

Each step runs only when the package it needs is installed; with torch alone none runs, and nothing
in torch is modified (the one process-wide effect of the layer itself is the optimizer-step hook of
:mod:`cbn_mmdet.models.iteration_clock`).

* mmengine: ``CBN``/``BRN`` registered in mmengine's ``MODELS`` (where mmcv's ``BN`` lives);
  :mod:`cbn_mmdet.compat` (checkpoint allow-list on torch >= 2.4, CPU distributed init and DDP);
  the ``cfg.sync_bn`` guard of :mod:`cbn_mmdet.engine.sync_bn_guard`.
* mmdet: the hooks (``CBNBurnInHook``, ``CBNMonitorHook``, ``NormSwitchHook``, ``RNGStateHook``) and
  the demo dataset, registered in mmdet's registries.
"""
import importlib.util

__all__ = ['available', 'setup']


def available(package: str) -> bool:
    """Whether ``package`` is installed (an installed but broken package still fails loudly later)."""
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # an import hook that hides the package
        return False


def setup() -> None:
    """Register and apply what the installed OpenMMLab packages need (idempotent)."""
    if not available('mmengine'):
        return
    from mmengine.registry import MODELS

    from . import compat
    from .models import BatchRenorm2d, CrossIterationBatchNorm2d
    compat.apply()
    MODELS.register_module('CBN', module=CrossIterationBatchNorm2d, force=True)
    MODELS.register_module('BRN', module=BatchRenorm2d, force=True)
    if not available('mmdet'):
        return
    from . import datasets, engine  # noqa: F401  (their modules register into mmdet's registries)
    engine.sync_bn_guard.install()
