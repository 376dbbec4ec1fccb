"""Input checks shared by the layers: shape, device and dtype errors that name the layer."""
from typing import Optional

import torch
from torch import Tensor

__all__ = ['check_4d', 'check_channels', 'check_like_module']

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def check_4d(owner: str, input: Tensor) -> None:
    if input.dim() != 4:
        raise ValueError(f'{owner} expects 4D (N, C, H, W) input (got {input.dim()}D input of shape '
                         f'{tuple(input.shape)})')


def check_channels(owner: str, input: Tensor, num_features: int) -> None:
    """``C`` of a 4-D ``input`` is the layer's ``num_features`` (one integer comparison; not while
    ``torch.jit.trace`` records, where shapes are tensors and the comparison would warn)."""
    if not torch.jit.is_tracing() and input.shape[1] != num_features:
        raise ValueError(f'{owner} expected input with {num_features} channels (num_features), got '
                         f'{input.shape[1]} (input of shape {tuple(input.shape)})')


def check_like_module(owner: str, input: Tensor, ref: Optional[Tensor]) -> None:
    """``input`` on the device of the layer's state ``ref``, in its dtype or in float16/bfloat16
    with a float32 layer (autocast, or a ``.half()`` model whose norms stay float32)."""
    if ref is None:
        return
    if input.device != ref.device:
        raise RuntimeError(f'{owner} input is on {input.device} but the layer is on {ref.device}')
    low_precision = input.dtype in _LOW_PRECISION and ref.dtype == torch.float32
    if input.dtype != ref.dtype and not low_precision:
        raise TypeError(f'{owner} input dtype {input.dtype} does not match the layer dtype {ref.dtype} '
                        '(allowed: the same dtype, or float16/bfloat16 input with a float32 layer)')
