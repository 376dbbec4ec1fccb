"""Everything ``import cbn_mmdet`` does to the OpenMMLab stack, in one place.

Each step runs only when the package it needs is installed; with torch alone none runs, and nothing
in torch is modified (the one process-wide effect of the layer itself is the optimizer-step hook of
:mod:`cbn_mmdet.models.iteration_clock`).

| effect | needs | applies to | off |
|---|---|---|---|
| ``CBN``/``BRN`` in mmengine's ``MODELS`` (where mmcv's ``BN`` lives) | mmengine | all | – |
| checkpoint allow-list for ``torch.load(weights_only=True)`` (:mod:`.compat`) | mmengine | torch >= 2.4 (needed from 2.6, where it is the default) with mmengine <= 0.10.7 | ``CBN_MMDET_COMPAT=0`` |
| CPU distributed init and CPU DDP (:mod:`.compat`) | mmengine | machines without CUDA only | ``CBN_MMDET_COMPAT=0`` |
| ``cfg.sync_bn`` refuses to replace CBN (:mod:`.engine.sync_bn_guard`) | mmdet | mmengine's ``Runner.wrap_model`` | – (remove ``sync_bn``) |
| the hooks in the ``HOOKS`` registry | mmdet | all | – |
"""
import importlib.util
import os

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
    if os.environ.get('CBN_MMDET_COMPAT', '1') != '0':
        compat.apply()
    MODELS.register_module('CBN', module=CrossIterationBatchNorm2d, force=True)
    MODELS.register_module('BRN', module=BatchRenorm2d, force=True)
    if not available('mmdet'):
        return
    from . import engine  # noqa: F401  (its modules register into mmdet's registries)
    engine.sync_bn_guard.install()
