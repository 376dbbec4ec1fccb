"""CBN's per-step bookkeeping on CPU as a few compiled passes (``csrc/cbn_cpu.cpp``) and a layer's
whole steady-state training step as two calls (``csrc/train_step.cpp``).

The Python functions of :mod:`.statistics` and :mod:`cbn_mmdet.models.window_history` are the
reference; the C++ ops compute the same formulas in one loop each, so that an eager training step
dispatches a handful of operations where the Python path dispatches some fifty (docs/design.md,
"Fused bookkeeping" and "The one-call training step"). They are built on first use with torch's C++
extension loader (a C++ compiler, ninja and Python's headers, as for mmcv's ops) into
``$CBN_EXTENSIONS_DIR`` (default ``~/.cache/cbn_mmdet/extensions``), one build per torch version.
``CBN_FUSED=0`` turns them off; where the build fails the layer warns once and takes the Python path.
"""
import contextlib
import os
import os.path as osp
import sys
import warnings
from typing import Optional

import torch

__all__ = ['ops', 'applies', 'disabled', 'one_call_ops', 'without_one_call']

_NAME = 'cbn_mmdet_cpu'
_SOURCES = [osp.join(osp.dirname(osp.abspath(__file__)), 'csrc', name)
            for name in ('cbn_cpu.cpp', 'train_step.cpp')]
_state = {'ops': None, 'module': None, 'tried': False, 'one_call': True}
_is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling


def _build_directory() -> str:
    root = os.environ.get('CBN_EXTENSIONS_DIR') or osp.join(osp.expanduser('~'), '.cache',
                                                             'cbn_mmdet', 'extensions')
    # one build per torch build and Python (a library built against another torch may not load)
    tag = f'torch{torch.__version__}-py{sys.version_info[0]}{sys.version_info[1]}'
    return osp.join(root, tag.replace('+', '_'))


def ops():
    """``torch.ops.cbn_mmdet`` with the fused CPU ops, or None when they are off or did not build."""
    if _state['tried']:
        return _state['ops']
    _state['tried'] = True
    setting = os.environ.get('CBN_FUSED', '1')
    if setting not in ('0', '1'):
        raise ValueError(f"CBN_FUSED must be '0' (the Python path) or '1' (the fused CPU ops, the "
                         f"default), got {setting!r}")
    if setting == '0':
        return None
    try:
        from torch.utils.cpp_extension import load
        directory = _build_directory()
        os.makedirs(directory, exist_ok=True)
        # a Python module (train_step) that also registers the torch ops
        _state['module'] = load(_NAME, _SOURCES, extra_cflags=['-O3', '-fopenmp'],
                                extra_ldflags=['-fopenmp'], build_directory=directory,
                                is_python_module=True, verbose=False)
        _state['ops'] = torch.ops.cbn_mmdet
    except Exception as err:  # no compiler, no ninja, a failed build: the Python path
        from ..models.notices import CBNWarning
        warnings.warn(f'CBN: the fused CPU bookkeeping ops did not build ({type(err).__name__}: '
                      f'{str(err).strip().splitlines()[-1] if str(err).strip() else ""}); using the '
                      'Python path (same results, more operations per step). Set CBN_FUSED=0 to '
                      'skip the build.', CBNWarning, stacklevel=2)
    return _state['ops']


def applies(t: torch.Tensor) -> Optional[object]:
    """The fused ops for the statistics tensor ``t`` (CPU, float32/float64, eager), else None."""
    if t.device.type != 'cpu' or t.dtype not in (torch.float32, torch.float64):
        return None
    if _is_compiling():
        return None
    return ops()


@contextlib.contextmanager
def disabled():
    """The Python path inside the block (tests compare the two paths)."""
    saved = dict(_state)
    _state.update(ops=None, module=None, tried=True)
    try:
        yield
    finally:
        _state.update(saved)


def one_call_ops() -> Optional[object]:
    """The module with a layer's one-call training step (``train_step``), None where it is off."""
    return _state['module'] if _state['one_call'] and ops() is not None else None


@contextlib.contextmanager
def without_one_call():
    """The fused ops without the one-call training step inside the block (tests compare the two)."""
    saved = _state['one_call']
    _state['one_call'] = False
    try:
        yield
    finally:
        _state['one_call'] = saved
