"""Compatibility fixes for mmengine 0.10.7 / mmcv 2.1.0 / mmdet 3.3.0 on current torch and numpy.

``import cbn_mmdet`` applies every fix once (:func:`apply`; off with ``CBN_MMDET_COMPAT=0``); nothing
in site-packages is edited. Each fix is narrow, idempotent and tested on its own
(``tests/test_compat.py``):

1. mmengine checkpoints load under ``torch.load(weights_only=True)`` (torch >= 2.6's default) through
   an allow-list of exactly what a runner checkpoint holds; pickles that would run code are refused.
2. ``tools/dist_train.sh`` and ``--launcher pytorch|slurm`` work on machines without CUDA (gloo).

Why it is done this way: ``docs/design.md``, "Compatibility fixes".
"""
from __future__ import annotations

import contextlib
import functools
import logging
import pickle
import warnings

import torch

__all__ = ['apply', 'checkpoint_safe_globals', 'HISTORY_BUFFER_METHODS']

#: HistoryBuffer's statistics methods, the only attributes :func:`_restricted_getattr` hands out.
HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')

_applied: set[str] = set()


def _history_buffer_cls():
    from mmengine.logging.history_buffer import HistoryBuffer
    return HistoryBuffer


def _restricted_getattr(obj, name):
    """Stand-in for ``builtins.getattr`` inside ``torch.load(weights_only=True)``.

    Returns ``HistoryBuffer.<name>`` for the statistics methods mmengine pickles and refuses every
    other lookup, so the allow-list cannot be used to reach arbitrary attributes.
    """
    if obj is _history_buffer_cls() and name in HISTORY_BUFFER_METHODS:
        return getattr(obj, name)
    raise pickle.UnpicklingError(
        f'cbn_mmdet.compat refused getattr({obj!r}, {name!r}) while loading a checkpoint with '
        'weights_only=True: only HistoryBuffer statistics methods '
        f'{HISTORY_BUFFER_METHODS} are allowed.')


def checkpoint_safe_globals() -> list:
    """The ``torch.serialization.add_safe_globals`` entries mmengine checkpoints need.

    Entries are objects (registered under their own ``module.qualname``) or ``(object, 'dotted.name')``
    tuples for the names older numpy versions and pickle protocol 2 write.
    """
    import numpy as np
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray

    entries: list = [_history_buffer_cls(), np.ndarray, np.dtype]
    for core in ('numpy.core', 'numpy._core'):
        entries.append((multiarray._reconstruct, f'{core}.multiarray._reconstruct'))
        entries.append((multiarray.scalar, f'{core}.multiarray.scalar'))
    # numpy >= 1.25 has a concrete DType class per dtype (numpy.dtypes.Float64DType, ...), which some
    # pickle paths name; they are plain dtype classes.
    dtypes_mod = getattr(np, 'dtypes', None)
    if dtypes_mod is not None:
        for name in dir(dtypes_mod):
            cls = getattr(dtypes_mod, name)
            if isinstance(cls, type) and issubclass(cls, np.dtype):
                entries.append((cls, f'numpy.dtypes.{name}'))
    entries.append((_restricted_getattr, 'builtins.getattr'))
    return entries


def _allow_mmengine_checkpoint_globals() -> None:
    if not hasattr(torch.serialization, 'add_safe_globals'):
        return  # torch < 2.4: torch.load defaults to weights_only=False, nothing is refused
    torch.serialization.add_safe_globals(checkpoint_safe_globals())


# --------------------------------------------------------------------------------------------------
# Distributed training on a machine without CUDA
# --------------------------------------------------------------------------------------------------
def _cpu_backend(backend: str) -> str:
    if backend == 'nccl':
        warnings.warn(
            "CUDA is not available: using the 'gloo' backend instead of 'nccl' for distributed "
            "training (set env_cfg.dist_cfg.backend='gloo' to choose it explicitly).",
            stacklevel=3)
        return 'gloo'
    return backend


@contextlib.contextmanager
def _without_cuda_set_device():
    """Make ``torch.cuda.set_device`` a no-op (it raises on a CPU build of torch)."""
    orig = torch.cuda.set_device
    torch.cuda.set_device = lambda device: None
    try:
        yield
    finally:
        torch.cuda.set_device = orig


def _patch_dist_init_for_cpu() -> None:
    from mmengine.dist import utils as dist_utils

    def cpu_safe(orig):
        @functools.wraps(orig)
        def init(backend, *args, **kwargs):
            if torch.cuda.is_available():
                return orig(backend, *args, **kwargs)
            with _without_cuda_set_device():
                return orig(_cpu_backend(backend), *args, **kwargs)
        init.__wrapped_by_cbn_mmdet__ = True
        return init

    # init_dist looks these up as module globals at call time.
    dist_utils._init_dist_pytorch = cpu_safe(dist_utils._init_dist_pytorch)
    dist_utils._init_dist_slurm = cpu_safe(dist_utils._init_dist_slurm)


def _patch_ddp_for_cpu_modules() -> None:
    from mmengine.model.wrappers import MMDistributedDataParallel

    orig_init = MMDistributedDataParallel.__init__

    @functools.wraps(orig_init)
    def __init__(self, module, detect_anomalous_params=False, **kwargs):
        params = list(module.parameters())
        if params and all(p.device.type == 'cpu' for p in params):
            # torch.nn.parallel.DistributedDataParallel: "device_ids ... must be None" for CPU
            # modules; mmengine's Runner.wrap_model always passes [LOCAL_RANK].
            kwargs.pop('device_ids', None)
            kwargs.pop('output_device', None)
        orig_init(self, module, detect_anomalous_params=detect_anomalous_params, **kwargs)

    MMDistributedDataParallel.__init__ = __init__


_FIXES = (
    ('checkpoint_safe_globals', _allow_mmengine_checkpoint_globals),
    ('dist_init_cpu', _patch_dist_init_for_cpu),
    ('ddp_cpu_module', _patch_ddp_for_cpu_modules),
)


def apply() -> None:
    """Apply every fix once (idempotent). Called by ``import cbn_mmdet`` when mmengine is installed."""
    for name, fix in _FIXES:
        if name in _applied:
            continue
        fix()
        _applied.add(name)
        logging.getLogger(__name__).debug('cbn_mmdet.compat: applied %s', name)
