"""Find the convolution that produced a norm layer's input, from the autograd graph.

mmdet/mmcv call ``norm(x)`` with no weight (``ConvModule``, ResNet's ``Bottleneck``/``BasicBlock``,
``downsample``), so CBN looks at ``x.grad_fn``: when ``x`` is the direct output of a 2-D convolution the
node is ``ConvolutionBackward0`` and exposes the conv's input, weight and geometry. This needs no forked
modules and no hooks on convs, and works for every place a conv feeds a norm (any padding, stride,
dilation, groups; AMP casts; channels_last). It needs grad mode: under ``torch.no_grad()`` there is no
graph, and CBN takes its documented fallback.
"""
import sys
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = ['is_compiling', 'ConvWeights', 'ConvBinding', 'BindStatus', 'AutogradPass', 'autograd_pass',
           'find_conv_producer', 'find_conv_weights', 'ConvProducer', 'ConvTap', 'preceding_conv']


#: whether ``torch.compile`` is tracing the calling code (``torch.compiler.is_compiling`` from torch 2.3)
is_compiling = getattr(torch.compiler, 'is_compiling', None) or torch._dynamo.is_compiling


class BindStatus:
    """Why a CBN layer can or cannot compensate at one forward."""
    CONV = 'conv'                # direct output of a conv with trainable weights: full CBN
    FROZEN_CONV = 'frozen_conv'  # conv weights do not require grad: they cannot change, Naive CBN is exact
    NOT_CONV = 'not_conv'        # input produced by something else (add, activation, pooling, ...)
    NO_GRAPH = 'no_graph'        # no autograd graph (no_grad, or nothing upstream requires grad)
    COMPILED = 'compiled'        # produced inside a torch.compile graph: the conv is not visible
    CONCAT = 'concat'            # a channel concatenation with at least one slice a trainable conv's
                                 # output: those slices compensated each with its conv (concat_binding)


@dataclass(frozen=True)
class ConvWeights:
    """The producing conv's current ``θ^l`` (and trainable bias): what compensation needs."""
    weight: Tensor                # θ_t^l, detached: the parameter itself (fp32 master under AMP) or,
                                  # for a weight computed from parameters, the weight the conv applied
    bias: Optional[Tensor]        # trainable bias (detached) or None (absent or frozen: constant)
    groups: int
    # the leaf parameters behind weight and bias, when θ is a parameter (not computed)
    parameters: Optional[Tuple[Tensor, Optional[Tensor]]] = None

    @property
    def geometry(self) -> Tuple[int, ...]:
        """``(C_out, C_in, kh, kw, groups, trainable bias)``: history recorded under another
        geometry is unusable (a bias that became frozen leaves its recorded term unmatched)."""
        c_out, c_in_g, kh, kw = self.weight.shape
        return (c_out, c_in_g * self.groups, kh, kw, self.groups, self.bias is not None)

    def current(self) -> 'ConvWeights':
        """The same conv's weights now (they are read through the parameters, which persist)."""
        if self.parameters is None:
            return self
        weight, bias = self.parameters
        return ConvWeights(weight.detach(), None if bias is None else bias.detach(), self.groups,
                           self.parameters)


@dataclass(frozen=True)
class ConvBinding(ConvWeights):
    """What CBN needs of the producing conv ``x = conv(input; weight, bias)`` at this iteration."""
    input: Optional[Tensor] = None  # the conv's input as saved by autograd (detached)
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)

    def weights(self) -> ConvWeights:
        """The weights alone, without the (activation-sized) input."""
        return ConvWeights(self.weight, self.bias, self.groups, self.parameters)


class AutogradPass:
    """What kind of forward a training-mode CBN call is (see :func:`autograd_pass`)."""
    RECORD = 'record'          # saved tensors readable: normalise and update history/running stats
    CHECKPOINT_FIRST = 'checkpoint_first'  # non-reentrant checkpoint, first pass: graph, no saved tensors
    NO_GRAD = 'no_grad'        # no graph (torch.no_grad, reentrant checkpoint's first pass)


def autograd_pass() -> str:
    """Classify the current forward. The state update of a checkpointed region happens once, in the
    pass whose saved tensors are readable (the recomputation during backward)."""
    if not torch.is_grad_enabled():
        return AutogradPass.NO_GRAD
    top = saved_tensor_hooks_accessor()
    if top is not None:
        hooks = top(False)
        first = hooks is not None and getattr(hooks[0], '__qualname__', '').startswith(
            '_checkpoint_hook.')
    else:
        first = _in_checkpoint_first_pass_by_frames()
    return AutogradPass.CHECKPOINT_FIRST if first else AutogradPass.RECORD


def saved_tensor_hooks_accessor():
    """torch's reader of the active saved-tensor hooks (torch >= 2.8), or None."""
    return getattr(torch._C._autograd, '_top_saved_tensors_default_hooks', None)


_CHECKPOINT_FILE = torch.utils.checkpoint.__file__


def _in_checkpoint_first_pass_by_frames() -> bool:
    """For torch without the hook reader: the nearest frame of torch.utils.checkpoint on the stack
    says where we are: its recomputation (``recompute_fn``/``unpack_hook``), or the first pass of a
    non-reentrant ``checkpoint`` call."""
    frame = sys._getframe(2)
    while frame is not None:
        code = frame.f_code
        if code.co_filename == _CHECKPOINT_FILE:
            if code.co_name in ('recompute_fn', 'unpack_hook', 'unpack_hook_with_error_cb'):
                return False
            if code.co_name == 'checkpoint' and frame.f_locals.get('use_reentrant') is False:
                return True
        frame = frame.f_back
    return False


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


def _conv_node(x: Tensor) -> Tuple[Optional[object], str, str]:
    fn = x.grad_fn
    if fn is None:
        return None, BindStatus.NO_GRAPH, 'no autograd graph'
    name = type(fn).__name__
    if name.startswith('CompiledFunction'):
        return None, BindStatus.COMPILED, name
    if name != 'ConvolutionBackward0':
        return None, BindStatus.NOT_CONV, name
    if fn._saved_transposed or len(fn._saved_stride) != 2:
        return None, BindStatus.NOT_CONV, f'{name} (transposed or not 2-D)'
    if fn.next_functions[1][0] is None:
        return None, BindStatus.FROZEN_CONV, name
    return fn, BindStatus.CONV, name


def _bias(fn) -> Tuple[bool, Optional[Tensor]]:
    """``(usable, bias parameter or None)`` of a conv node."""
    bias_fn = fn.next_functions[2][0] if len(fn.next_functions) > 2 else None
    if bias_fn is None:
        return True, None
    bias = _leaf_parameter(bias_fn)
    return bias is not None, bias


def find_conv_producer(x: Tensor) -> Tuple[Optional[ConvBinding], str, str]:
    """Bind ``x`` to the conv that produced it (reads the conv's saved input and weight).

    Returns ``(binding, status, detail)``: ``binding`` is set only for :attr:`BindStatus.CONV`;
    ``detail`` names the producing autograd node for messages.
    """
    fn, status, name = _conv_node(x)
    if fn is None:
        return None, status, name
    saved_weight = fn._saved_weight
    weight = _leaf_parameter(fn.next_functions[1][0])
    usable, bias = _bias(fn)
    if not usable:
        return None, BindStatus.NOT_CONV, f'{name} (its bias is computed, not a parameter)'
    if weight is not None and weight.shape == saved_weight.shape:
        parameters = (weight, bias)
    else:
        # The weight is computed from parameters (e.g. weight standardization): θ^l is what the conv
        # actually applied, which autograd saved.
        weight, parameters = saved_weight, None
    binding = ConvBinding(
        weight=weight.detach(), bias=None if bias is None else bias.detach(),
        # (the input is read under no_grad only: no detached alias needed)
        groups=int(fn._saved_groups), parameters=parameters, input=fn._saved_input,
        stride=tuple(fn._saved_stride), padding=tuple(fn._saved_padding),
        dilation=tuple(fn._saved_dilation))
    return binding, BindStatus.CONV, name


def find_conv_weights(x: Tensor) -> Tuple[Optional[ConvWeights], str, str]:
    """Like :func:`find_conv_producer` but reads no saved tensor: the conv's weight and bias
    parameters only (``None`` with ``NOT_CONV`` when the weight is computed: it is only saved)."""
    fn, status, name = _conv_node(x)
    if fn is None:
        return None, status, name
    weight = _leaf_parameter(fn.next_functions[1][0])
    usable, bias = _bias(fn)
    if weight is None or not usable:
        return None, BindStatus.NOT_CONV, f'{name} (computed weight or bias)'
    weights = ConvWeights(weight.detach(), None if bias is None else bias.detach(),
                          int(fn._saved_groups), (weight, bias))
    return weights, BindStatus.CONV, name


class ConvProducer:
    """The conv feeding one norm layer, found by the kind of autograd pass (:func:`autograd_pass`).

    A recorded pass reads the conv's saved tensors and is remembered; the first pass of an activation
    checkpoint reads only the conv's parameters; a pass without a graph reuses the remembered conv
    (the same module runs), with its current weights.
    """

    def __init__(self):
        self.last: Optional[Tuple[Optional[ConvWeights], str, str]] = None

    def bind(self, x: Tensor, kind: str) -> Tuple[Optional[ConvWeights], str, str]:
        """``(binding, status, detail)``; a :class:`ConvBinding` only on a recorded pass."""
        if kind == AutogradPass.RECORD:
            if x.grad_fn is None:
                # grad mode on but nothing upstream requires grad: every weight before us is fixed
                return None, BindStatus.FROZEN_CONV, 'nothing upstream is trainable'
            binding, status, detail = find_conv_producer(x)
            self.last = (None if binding is None else binding.weights(), status, detail)
            return binding, status, detail
        if kind == AutogradPass.CHECKPOINT_FIRST and x.grad_fn is not None:
            return find_conv_weights(x)
        if self.last is None:
            return None, BindStatus.NO_GRAPH, 'grad mode disabled'
        weights, status, detail = self.last
        return (None if weights is None else weights.current()), status, detail


class ConvTap:
    """A forward hook on the conv registered just before a CBN layer in its parent module (mmcv's
    ``ConvModule``, ResNet blocks, ``nn.Sequential``): under ``torch.compile`` the autograd graph of
    the traced forward is not visible, so the conv's input and output are taken here instead, and the
    layer checks that its input *is* that output. In eager mode the hook keeps nothing."""

    def __init__(self, conv: torch.nn.Conv2d):
        self.conv = conv
        self.input: Optional[Tensor] = None
        self.output: Optional[Tensor] = None

    def __call__(self, module, args, output) -> None:
        if is_compiling():
            self.input, self.output = args[0], output

    def bind(self, x: Tensor) -> Tuple[Optional[ConvBinding], str, str]:
        """Like :func:`find_conv_producer`, for a traced forward (then forgets the tensors)."""
        conv, conv_input, produced = self.conv, self.input, self.output
        self.input = self.output = None
        name = f'{type(conv).__name__} registered before the layer'
        if produced is not x:
            return None, BindStatus.NOT_CONV, ('under torch.compile, input that is not the output of '
                                               f'the {name}')
        if not torch.is_grad_enabled() or not conv.weight.requires_grad:
            return None, BindStatus.FROZEN_CONV, name
        padding = _numeric_padding(conv)
        if padding is None:
            return None, BindStatus.NOT_CONV, f"{name} (padding='same' with an even kernel)"
        if conv.padding_mode != 'zeros':  # the conv pads the input itself, then pads nothing
            conv_input = torch.nn.functional.pad(conv_input, conv._reversed_padding_repeated_twice,
                                                 mode=conv.padding_mode)
            padding = (0, 0)
        bias = conv.bias if conv.bias is not None and conv.bias.requires_grad else None
        binding = ConvBinding(
            weight=conv.weight.detach(), bias=None if bias is None else bias.detach(),
            groups=conv.groups, parameters=(conv.weight, bias), input=conv_input.detach(),
            stride=tuple(conv.stride), padding=padding, dilation=tuple(conv.dilation))
        return binding, BindStatus.CONV, name


def _numeric_padding(conv: torch.nn.Conv2d) -> Optional[Tuple[int, int]]:
    """The conv's padding as two ints (``'same'`` resolved when symmetric), or None."""
    if conv.padding == 'valid':
        return (0, 0)
    if conv.padding == 'same':
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in total):
            return None
        return tuple(t // 2 for t in total)
    return tuple(conv.padding)


def preceding_conv(parent: torch.nn.Module, name: str) -> Optional[torch.nn.Conv2d]:
    """The 2-D conv registered in ``parent`` just before the child ``name`` (or last, when ``name``
    is not registered yet), if there is one."""
    before = None
    for child_name, child in parent._modules.items():
        if child_name == name:
            break
        before = child
    if isinstance(before, torch.nn.Conv2d):
        return before
    return None
