"""Find the convolution that produced a norm layer's input, from the autograd graph.

mmdet/mmcv call ``norm(x)`` with no weight (``ConvModule``, ResNet's ``Bottleneck``/``BasicBlock``,
``downsample``), so CBN looks at ``x.grad_fn``: when ``x`` is the direct output of a 2-D convolution the
node is ``ConvolutionBackward0`` and exposes the conv's input, weight and geometry. This needs no forked
modules and no hooks on convs, and works for every place a conv feeds a norm (any padding, stride,
dilation, groups; AMP casts; channels_last). It needs grad mode: under ``torch.no_grad()`` there is no
graph, and CBN takes its documented fallback.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ['ConvBinding', 'BindStatus', 'find_conv_producer']


class BindStatus:
    """Why a CBN layer can or cannot compensate at one forward."""
    CONV = 'conv'                # direct output of a conv with trainable weights: full CBN
    FROZEN_CONV = 'frozen_conv'  # conv weights do not require grad: they cannot change, Naive CBN is exact
    NOT_CONV = 'not_conv'        # input produced by something else (add, activation, pooling, ...)
    NO_GRAPH = 'no_graph'        # no autograd graph (no_grad, or nothing upstream requires grad)


@dataclass(frozen=True)
class ConvBinding:
    """What CBN needs of the producing conv ``x = conv(input; weight, bias)`` at this iteration."""
    input: Tensor                 # the conv's input as saved by autograd (detached)
    weight: Tensor                # θ_t^l, detached: the parameter itself (fp32 master under AMP) or,
                                  # for a weight computed from parameters, the weight the conv applied
    bias: Optional[Tensor]        # trainable bias (detached) or None (absent or frozen: constant)
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    dilation: Tuple[int, int]
    groups: int

    @property
    def geometry(self) -> Tuple[int, ...]:
        """``(C_out, C_in, kh, kw, groups)``: history recorded under another geometry is unusable."""
        c_out, c_in_g, kh, kw = self.weight.shape
        return (c_out, c_in_g * self.groups, kh, kw, self.groups)


def _leaf_parameter(fn) -> Optional[Tensor]:
    """The leaf tensor behind a weight/bias edge, seeing through AMP's dtype casts."""
    while fn is not None:
        name = type(fn).__name__
        if name == 'AccumulateGrad':
            return fn.variable
        if name == 'ToCopyBackward0' and len(fn.next_functions) == 1:
            fn = fn.next_functions[0][0]
            continue
        return None
    return None


def find_conv_producer(x: Tensor) -> Tuple[Optional[ConvBinding], str, str]:
    """Bind ``x`` to the conv that produced it.

    Returns ``(binding, status, detail)``: ``binding`` is set only for :attr:`BindStatus.CONV`;
    ``detail`` names the producing autograd node for messages.
    """
    fn = x.grad_fn
    if fn is None:
        return None, BindStatus.NO_GRAPH, 'no autograd graph'
    name = type(fn).__name__
    if name != 'ConvolutionBackward0':
        return None, BindStatus.NOT_CONV, name
    if fn._saved_transposed or len(fn._saved_stride) != 2:
        return None, BindStatus.NOT_CONV, f'{name} (transposed or not 2-D)'
    weight_fn = fn.next_functions[1][0]
    if weight_fn is None:
        return None, BindStatus.FROZEN_CONV, name
    saved_weight = fn._saved_weight
    weight = _leaf_parameter(weight_fn)
    if weight is None or weight.shape != saved_weight.shape:
        # The weight is computed from parameters (e.g. weight standardization): θ^l is what the conv
        # actually applied, which autograd saved.
        weight = saved_weight
    bias_fn = fn.next_functions[2][0] if len(fn.next_functions) > 2 else None
    bias = None
    if bias_fn is not None:
        bias = _leaf_parameter(bias_fn)
        if bias is None:
            return None, BindStatus.NOT_CONV, f'{name} (its bias is computed, not a parameter)'
    binding = ConvBinding(
        input=fn._saved_input.detach(), weight=weight.detach(),
        bias=None if bias is None else bias.detach(),
        stride=tuple(fn._saved_stride), padding=tuple(fn._saved_padding),
        dilation=tuple(fn._saved_dilation), groups=int(fn._saved_groups))
    return binding, BindStatus.CONV, name
