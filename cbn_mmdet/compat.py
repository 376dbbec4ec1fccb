"""Compatibility fixes for mmengine 0.10.7 / mmcv 2.1.0 / mmdet 3.3.0 on current torch and numpy.

``import cbn_mmdet`` applies every fix once (:func:`apply`); nothing in site-packages is edited. Each fix
is narrow, idempotent and testable on its own (``tests/test_compat.py``).

1. Loading mmengine checkpoints under ``torch.load(weights_only=True)`` (torch >= 2.6 default)
-------------------------------------------------------------------------------------------------
mmengine 0.10.7 calls ``torch.load(filename, map_location=...)`` without ``weights_only``, so on
torch >= 2.6 every checkpoint goes through torch's restricted unpickler, and every checkpoint the
runner writes is refused (``Unsupported global: GLOBAL mmengine.logging.history_buffer.HistoryBuffer``):
``--resume``, ``load_from`` and ``tools/test.py CONFIG CKPT`` all fail.

The choices were (a) ``weights_only=False`` (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``) everywhere,
(b) ``weights_only=False`` only for the runner's own checkpoints (resume) and the restricted
unpickler for ``load_from``/test, (c) keep the restricted unpickler for *every* load and allow-list
exactly what mmengine writes. We do (c): no load in this package ever runs arbitrary pickle code, not
even ``--resume PATH`` (a path the user may have downloaded like any ``load_from``), and resume needs
no separate, weaker code path. The allow-list is what a runner checkpoint actually contains
(``meta``, ``state_dict``, ``message_hub``, ``optimizer``, ``param_schedulers``):

* ``mmengine.logging.HistoryBuffer`` — the message hub's scalar logs. Rebuilt with ``__new__`` +
  its own ``__setstate__``, never ``__init__`` or arbitrary calls. (``__setstate__`` merges the
  pickled ``statistics_methods`` into the class-wide method table: a crafted file can put other
  allow-listed objects there, which makes ``HistoryBuffer.statistics`` fail later, but it cannot
  introduce anything the allow-list does not already contain.)
* numpy arrays, scalars and dtypes inside the HistoryBuffers (``_reconstruct``, ``ndarray``,
  ``dtype``, ``scalar`` and the concrete ``numpy.dtypes.*DType`` classes), under both the numpy 1.x
  (``numpy.core``) and numpy 2.x (``numpy._core``) module names, so old checkpoints load too. They
  only rebuild arrays and scalars from a dtype, a shape and raw bytes; object arrays get their
  elements from the same restricted unpickler.
* ``builtins.getattr`` — pickle protocol 2 writes the bound HistoryBuffer statistics methods that
  ``HistoryBuffer.__getstate__`` includes as ``getattr(HistoryBuffer, 'mean')``. Allow-listing the
  real ``getattr`` would defeat the restricted unpickler (it reaches any attribute of any allowed
  object), so the name ``builtins.getattr`` is bound to :func:`_restricted_getattr`, which returns
  only ``HistoryBuffer.{min,max,current,mean}`` and raises ``UnpicklingError`` for anything else.

Everything else (``os.system``, ``subprocess``, ``eval``, arbitrary classes, the real ``getattr``)
is still refused. A checkpoint carrying other Python objects (e.g. a custom hook that saves one)
fails with torch's ``Unsupported global`` message; allow-list that type with
``torch.serialization.add_safe_globals`` after checking it is safe, or — only for a file you trust —
set ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``.

The allow-list is process-wide (``torch.serialization.add_safe_globals``), so it also covers
``torch.load`` calls made directly by users and by mmengine's URL loaders.

2. ``tools/dist_train.sh`` / ``--launcher pytorch|slurm`` on a machine without CUDA
----------------------------------------------------------------------------------
mmengine's ``_init_dist_pytorch``/``_init_dist_slurm`` call ``torch.cuda.set_device`` unconditionally
(an ``AttributeError`` on a CPU build of torch), and ``Runner.wrap_model`` passes
``device_ids=[LOCAL_RANK]`` to DDP, which torch rejects for a CPU module. When CUDA is unavailable
the init skips ``set_device`` and, if the backend is ``nccl`` (mmengine's default, which cannot run
without CUDA), uses ``gloo`` with a warning; set ``env_cfg.dist_cfg.backend=gloo`` to say it
explicitly. ``MMDistributedDataParallel`` drops ``device_ids``/``output_device`` for a CPU module.
With CUDA present nothing changes.
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
