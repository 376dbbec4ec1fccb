"""Everything ``import cbn_mmdet`` does beyond defining its classes, in one place (:func:`setup`).

Each step runs only when the package it needs is installed; with torch alone only the first two run,
and nothing in torch is modified.

.. list-table::
   :header-rows: 1

   * - effect
     - needs
     - applies to
     - off
   * - iteration clock: a global optimizer post-step hook (:mod:`.models.iteration_clock`)
     - torch
     - every torch optimizer
     - – (how CBN counts iterations; loops without one call ``next_iteration()``)
   * - conv taps: a global module registration hook that puts a forward hook on the conv registered
       just before each CBN layer (:func:`.models.cbn.install_conv_taps`; it keeps tensors only
       while ``torch.compile`` traces)
     - torch
     - CBN layers registered after the import
     - – (how a compiled CBN finds its conv)
   * - ``CBN``/``SyncCBN``/``BRN`` in mmengine's ``MODELS`` (where mmcv's ``BN`` lives)
     - mmengine
     - all
     - –
   * - the hooks in mmengine's ``HOOKS`` (found by mmdet/mmseg/mmpretrain configs)
     - mmengine
     - all
     - –
   * - checkpoint allow-list for ``torch.load(weights_only=True)`` (:mod:`.compat`)
     - mmengine
     - torch >= 2.4 (needed from 2.6, where it is the default) with mmengine <= 0.10.7
     - ``CBN_MMDET_COMPAT=0``
   * - CPU distributed init and CPU DDP (:mod:`.compat`)
     - mmengine
     - machines without CUDA only
     - ``CBN_MMDET_COMPAT=0``
   * - ``cfg.sync_bn`` refuses to replace CBN by SyncBN; ``sync_bn='SyncCBN'`` makes it SyncCBN
       (:mod:`.engine.sync_bn_guard`)
     - mmengine
     - mmengine's ``Runner.wrap_model``
     - – (remove ``sync_bn``)
   * - ``Runner.save_checkpoint`` gathers every process's SyncCBN history
       (:mod:`.engine.sync_cbn_checkpoint`)
     - mmengine
     - models with SyncCBN in distributed runs
     - –
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
    """Install and register what the installed packages need (idempotent)."""
    from .models import (BatchRenorm2d, CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d,
                         cbn, iteration_clock)
    iteration_clock.install()
    cbn.install_conv_taps()
    if not available('mmengine'):
        return
    from mmengine.registry import MODELS

    from . import compat
    if os.environ.get('CBN_MMDET_COMPAT', '1') != '0':
        compat.apply()
    MODELS.register_module('CBN', module=CrossIterationBatchNorm2d, force=True)
    MODELS.register_module('SyncCBN', module=SyncCrossIterationBatchNorm2d, force=True)
    MODELS.register_module('BRN', module=BatchRenorm2d, force=True)
    from . import engine  # noqa: F401  (its hook modules register into mmengine's HOOKS)
    engine.sync_bn_guard.install()
    engine.sync_cbn_checkpoint.install()
