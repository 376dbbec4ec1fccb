"""Bind a norm layer's input that is a channel concatenation to the convs that produced its slices.

DenseNet's pre-activation norms see ``torch.cat([x_0, y_1, ..., y_j], 1)``. BN's statistics are per
channel, so the mean and variance of the concatenation are those of its slices side by side, and the
first-order compensation of a slice (Eqs. 7-8) involves only the conv that produced it. Its autograd
node is ``CatBackward0`` (dimension 1), whose ``next_functions`` are the producers of the slices, in
channel order. Each slice is classified like a single input (:mod:`.conv_binding`):

* the direct output of a 2-D conv with trainable weights: compensated with that conv's ``θ``;
* ``AvgPool2d`` of a 1×1, stride-1, unpadded conv's output (DenseNet's transitions): the pool and the
  conv commute (``pool(θ y + b) = θ pool(y) + b``: each window's weights sum to one; without a bias
  any pool padding too), so the slice is a 1×1 conv of the pooled input, compensated with ``θ``;
* a frozen conv, or a slice that does not require grad: its weights cannot change, used as recorded
  (exact);
* anything else (a max-pooled stem, an activation, dropout): used as recorded (Naive CBN for those
  channels);
* the output of a ``torch.compile`` graph (``CompiledFunctionBackward``): its conv is not visible, so
  the layer refuses (``BindStatus.COMPILED``), as it does for a single conv's output.

A nested concatenation along channels is flattened. A slice's width is read from its producer's
output metadata; a slice without producer (a tensor that does not require grad) takes the channels
left over, so at most one run of such slices is allowed.
"""
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .conv_binding import (AutogradPass, BindStatus, ConvBinding, ConvWeights, _bias,
                           _leaf_parameter)

__all__ = ['Slice', 'SliceBinding', 'ConcatProducer', 'find_concat_producers']

# what a slice is (the channels it covers are compensated only for COMPENSATED)
COMPENSATED = 'conv'      # a trainable conv's output (or an average pool of a 1x1 conv's)
FIXED = 'fixed'           # a frozen conv or a constant: used as recorded, exact
AS_RECORDED = 'other'     # anything else: used as recorded (naive)


@dataclass(frozen=True)
class Slice:
    """Channels ``[start, start + width)`` of a concatenation and what produced them."""
    start: int
    width: int
    kind: str                             # COMPENSATED, FIXED or AS_RECORDED
    detail: str                           # the producing autograd node(s)
    weights: Optional[ConvWeights] = None  # COMPENSATED: a ConvBinding on a recorded pass

    @property
    def stop(self) -> int:
        return self.start + self.width


@dataclass(frozen=True)
class SliceBinding:
    """The slices of a concatenation, in channel order, covering all its channels."""
    slices: Tuple[Slice, ...]

    @property
    def compensated(self) -> Tuple[Slice, ...]:
        return tuple(s for s in self.slices if s.kind == COMPENSATED)

    @property
    def as_recorded(self) -> Tuple[Slice, ...]:
        """The slices used without compensation although something upstream is trainable."""
        return tuple(s for s in self.slices if s.kind == AS_RECORDED)

    @property
    def parameters(self):
        """None when some compensated slice's weight is computed (then only saved), as
        :attr:`ConvWeights.parameters`; the layer warns about stale weights on such passes."""
        if any(s.weights.parameters is None for s in self.compensated):
            return None
        return tuple(s.weights.parameters for s in self.compensated)

    def weights(self) -> 'SliceBinding':
        """The same slices with the weights alone (no activation-sized inputs kept)."""
        return SliceBinding(tuple(
            s if s.weights is None else replace(s, weights=_plain_weights(s.weights))
            for s in self.slices))

    def current(self) -> 'SliceBinding':
        """The same slices with their convs' weights now."""
        return SliceBinding(tuple(s if s.weights is None else replace(s, weights=s.weights.current())
                                  for s in self.slices))

    def describe(self) -> str:
        done = len(self.compensated)
        return (f'CatBackward0 of {len(self.slices)} slices, {done} compensated with their conv'
                + ''.join(f'; channels {s.start}-{s.stop - 1} as recorded ({s.detail})'
                          for s in self.as_recorded))


def _plain_weights(w: ConvWeights) -> ConvWeights:
    return w.weights() if isinstance(w, ConvBinding) else w


def _cat_node(fn) -> bool:
    return fn is not None and type(fn).__name__ == 'CatBackward0' and fn._saved_dim in (1, -3)


def _producers(fn, out: list, depth: int = 0) -> bool:
    """The producers ``(node, output_nr)`` of a channel concatenation in channel order, nested
    concatenations flattened; False when too deep."""
    if depth > 8:
        return False
    for node, nr in fn.next_functions:
        if _cat_node(node):
            if not _producers(node, out, depth + 1):
                return False
        else:
            out.append((node, nr))
    return True


def _width(node, nr: int) -> Optional[int]:
    """The channels of a producer's output, from its metadata (None: unknown)."""
    if node is None:
        return None
    metadata = getattr(node, '_input_metadata', None)  # (torch >= 2.2)
    if metadata is None or nr >= len(metadata):
        return None
    shape = metadata[nr].shape
    return int(shape[1]) if len(shape) == 4 else None


def _conv_of(fn) -> Tuple[Optional[object], str]:
    """``(conv node, kind)`` of a 2-D conv node: COMPENSATED, FIXED (frozen), or not a conv."""
    if fn is None or type(fn).__name__ != 'ConvolutionBackward0':
        return None, AS_RECORDED
    if fn._saved_transposed or len(fn._saved_stride) != 2:
        return None, AS_RECORDED
    if fn.next_functions[1][0] is None:
        return fn, FIXED
    return fn, COMPENSATED


def _conv_weights(fn, kind: str, read_saved: bool) -> Optional[ConvWeights]:
    """The conv's weights (a :class:`ConvBinding` with its input when ``read_saved``), or None when
    its bias is computed, or its weight is computed and cannot be read in this pass."""
    usable, bias = _bias(fn)
    if not usable:
        return None
    weight = _leaf_parameter(fn.next_functions[1][0])
    groups = int(fn._saved_groups)
    if not read_saved:
        if weight is None:
            return None
        return ConvWeights(weight.detach(), None if bias is None else bias.detach(), groups,
                           (weight, bias))
    saved_weight = fn._saved_weight
    if weight is not None and weight.shape == saved_weight.shape:
        parameters = (weight, bias)
    else:  # computed from parameters (weight standardisation): what the conv applied
        weight, parameters = saved_weight, None
    return ConvBinding(weight=weight.detach(), bias=None if bias is None else bias.detach(),
                       groups=groups, parameters=parameters, input=fn._saved_input,
                       stride=tuple(fn._saved_stride), padding=tuple(fn._saved_padding),
                       dilation=tuple(fn._saved_dilation))


def _pooled_conv(fn) -> Optional[object]:
    """The conv node under an ``AvgPool2d`` that may commute with it (a stride-1, unpadded conv; a
    pool with padding only without a conv bias; the caller checks that the kernel is 1×1), else
    None."""
    if fn is None or type(fn).__name__ != 'AvgPool2DBackward0':
        return None
    conv, _ = _conv_of(fn.next_functions[0][0])
    if conv is None or tuple(fn._saved_kernel_size) == ():
        return None
    if tuple(conv._saved_stride) != (1, 1) or tuple(conv._saved_padding) != (0, 0):
        return None
    if fn._saved_divisor_override is not None:
        return None
    padded = any(int(p) for p in fn._saved_padding)
    has_bias = len(conv.next_functions) > 2 and conv.next_functions[2][0] is not None
    if padded and has_bias:
        return None
    return conv


def _pool_binding(pool, binding: ConvBinding) -> Optional[ConvBinding]:
    """The 1×1 conv of the pooled input that equals ``pool(conv(input))``."""
    if binding.weight.shape[2:] != (1, 1):
        return None
    kernel = tuple(pool._saved_kernel_size)
    stride = tuple(pool._saved_stride) or kernel
    with torch.no_grad():
        pooled = torch.nn.functional.avg_pool2d(
            binding.input, kernel, stride, tuple(pool._saved_padding), bool(pool._saved_ceil_mode),
            bool(pool._saved_count_include_pad))
    return replace(binding, input=pooled, stride=(1, 1), padding=(0, 0), dilation=(1, 1))


def _classify(node, kind_of_pass: str) -> Tuple[str, str, Optional[ConvWeights]]:
    """``(kind, detail, weights)`` of one slice's producer."""
    if node is None:
        return FIXED, 'does not require grad', None
    name = type(node).__name__
    read_saved = kind_of_pass == AutogradPass.RECORD
    conv, kind = _conv_of(node)
    pool = None
    if conv is None:
        conv = _pooled_conv(node)
        if conv is None:
            return AS_RECORDED, name, None
        pool, kind = node, _conv_of(conv)[1]
        name = f'{name} of ConvolutionBackward0'
    if kind == FIXED:
        return FIXED, name, None
    weights = _conv_weights(conv, kind, read_saved)
    if weights is not None and pool is not None:
        if weights.weight.shape[2:] != (1, 1):
            return AS_RECORDED, name, None
        if read_saved:
            weights = _pool_binding(pool, weights)
    if weights is None:
        return AS_RECORDED, f'{name} (computed weight or bias)', None
    return COMPENSATED, name, weights


def find_concat_producers(x: Tensor, kind_of_pass: str = AutogradPass.RECORD
                          ) -> Tuple[Optional[SliceBinding], str]:
    """The slices of a channel concatenation ``x`` (``(binding, detail)``; ``binding`` None when
    ``x`` is not one, or its slices cannot be told apart)."""
    fn = x.grad_fn
    if not _cat_node(fn):
        return None, type(fn).__name__ if fn is not None else 'no autograd graph'
    producers: List[tuple] = []
    if not _producers(fn, producers):
        return None, 'CatBackward0 (nested too deep)'
    widths = [_width(node, nr) for node, nr in producers]
    unknown = [i for i, w in enumerate(widths) if w is None]
    known = sum(w for w in widths if w is not None)
    if unknown:
        # one run of slices without metadata (tensors that do not require grad): the rest
        if unknown != list(range(unknown[0], unknown[-1] + 1)) or any(
                producers[i][0] is not None for i in unknown) or known >= x.shape[1]:
            return None, 'CatBackward0 (slice widths unknown)'
        for i in unknown:
            widths[i] = 0
        widths[unknown[0]] = x.shape[1] - known
    elif known != x.shape[1]:
        return None, 'CatBackward0 (slice widths do not add up)'
    slices, start = [], 0
    for (node, _), width, index in zip(producers, widths, range(len(producers))):
        if width == 0 and index in unknown:
            continue
        kind, detail, weights = _classify(node, kind_of_pass)
        slices.append(Slice(start, width, kind, detail, weights))
        start += width
    return SliceBinding(_merge_uncompensated(slices)), 'CatBackward0'


def _merge_uncompensated(slices: List[Slice]) -> Tuple[Slice, ...]:
    """Neighbouring slices that are not compensated, as one (fewer pieces to put together)."""
    merged: List[Slice] = []
    for s in slices:
        last = merged[-1] if merged else None
        if last is not None and s.kind != COMPENSATED and last.kind != COMPENSATED:
            kind = AS_RECORDED if AS_RECORDED in (s.kind, last.kind) else FIXED
            detail = last.detail if last.detail == s.detail else f'{last.detail}, {s.detail}'
            merged[-1] = Slice(last.start, last.width + s.width, kind, detail)
        else:
            merged.append(s)
    return tuple(merged)


class ConcatProducer:
    """The slices feeding one norm layer, by the kind of autograd pass (like :class:`ConvProducer`):
    a recorded pass reads the convs' saved tensors and is remembered, the first pass of an activation
    checkpoint reads their parameters, a pass without a graph reuses the remembered slices with
    their convs' current weights."""

    def __init__(self):
        self.last: Optional[SliceBinding] = None

    def bind(self, x: Tensor, kind: str, binding, status: str, detail: str):
        """Refine a ``NOT_CONV`` (or graph-less) binding of ``x`` into :attr:`BindStatus.CONCAT`
        when ``x`` is a concatenation with a compensable slice; otherwise return it unchanged."""
        if kind == AutogradPass.NO_GRAD or x.grad_fn is None:
            if self.last is None or status not in (BindStatus.NOT_CONV, BindStatus.NO_GRAPH):
                return binding, status, detail
            return self.last.current(), BindStatus.CONCAT, self.last.describe()
        slices, why = find_concat_producers(x, kind)
        if slices is None:
            return binding, status, detail if why == 'CatBackward0' else why
        compiled = sorted({s.detail for s in slices.slices if 'CompiledFunction' in s.detail})
        if compiled:  # a slice's conv ran in a torch.compile graph: refused like a single conv
            return None, BindStatus.COMPILED, f"CatBackward0 of {', '.join(compiled)}"
        if not slices.compensated:
            if kind == AutogradPass.RECORD:
                self.last = None
            what = ', '.join(sorted({s.detail for s in slices.slices}))
            return binding, status, f'CatBackward0 of {what}'
        if kind == AutogradPass.RECORD:
            self.last = slices.weights()
        return slices, BindStatus.CONCAT, slices.describe()
