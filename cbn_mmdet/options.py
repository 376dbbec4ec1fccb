"""Argument checks of the layers and hooks: every error names the owner, the setting, what is allowed
and the value given, so a config typo is found from the message alone."""
import inspect
import numbers
from typing import Any, Callable, Iterable

import torch
from torch.nn.modules.batchnorm import _NormBase

__all__ = ['reject_unknown', 'require', 'require_choice', 'require_bool', 'is_real', 'is_int',
           'NORM_TAKES_BIAS', 'bn_bias_kwargs']

_NOT_OPTIONS = ('self', 'unknown', 'device', 'dtype')

#: whether this torch's BatchNorm takes ``bias`` (``bias=False``: a learnable scale γ, no shift β)
NORM_TAKES_BIAS = 'bias' in inspect.signature(_NormBase.__init__).parameters


def reject_unknown(owner: str, unknown: dict, init: Callable, note: str = '') -> None:
    """Raise for keyword arguments ``init`` does not take.

    The classes take ``**unknown`` instead of leaving the error to Python because Python's message
    names only the unexpected key; this one also lists the accepted ones (read from ``init``'s
    signature, so the list cannot drift).
    """
    if unknown:
        allowed = [p for p in inspect.signature(init).parameters if p not in _NOT_OPTIONS]
        raise TypeError(f'{owner} got unknown option(s) {sorted(unknown)}; allowed: '
                        f'{", ".join(allowed) or "(none)"}{note}')


def require(ok: bool, owner: str, name: str, expected: str, value: Any) -> None:
    """``ValueError('<owner> <name> must be <expected>, got <value>')`` unless ``ok``."""
    if not ok:
        raise ValueError(f'{owner} {name} must be {expected}, got {value!r}')


def require_choice(owner: str, name: str, value: Any, allowed: Iterable) -> None:
    allowed = tuple(allowed)
    require(value in allowed, owner, name, f'one of {allowed}', value)


def require_bool(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f'{owner} {name} must be True or False, got {value!r}')


def bn_bias_kwargs(owner: str, bias: Any) -> dict:
    """The ``bias`` keyword to pass to ``_BatchNorm.__init__``: ``{'bias': bias}`` where this torch
    takes it; on an older torch ``{}``, and ``bias=False``, which it cannot build, is refused."""
    require_bool(owner, 'bias', bias)
    if NORM_TAKES_BIAS:
        return dict(bias=bias)
    require(bias, owner, 'bias', f'True with torch {torch.__version__}, whose BatchNorm has no bias '
            'argument (bias=False, a scale without shift, needs a newer torch)', bias)
    return {}


def is_real(value: Any) -> bool:
    """A real number, not a bool, not NaN."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and value == value


def is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
