"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), a drop-in ``_BatchNorm``."""
import contextlib
import functools
import warnings
import weakref
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops import fused, statistics
from ..ops.statistics import (batch_moments, conv_statistic_gradients, finite_flag,
                              running_factor, update_running_, window_statistics)
from ..ops.window_norm import WindowBatchNormFunction
from ..options import (bn_bias_kwargs, is_int, is_real, reject_unknown, require, require_bool,
                       require_choice)
from . import iteration_clock
from .concat_binding import ConcatProducer
from .conv_binding import (AutogradPass, BindStatus, ConvProducer, ConvTap, autograd_pass,
                           is_compiling, preceding_conv, saved_tensor_hooks_accessor)
from .input_checks import check_4d, check_channels, check_like_module
from .notices import CBNWarning
from .slice_history import ConcatHistories, SliceHistory
from .torchscript import refuse_torchscript
from .window_history import HISTORY_KEYS, HISTORY_VERSION, CallHistories, WindowHistory

__all__ = ['CrossIterationBatchNorm2d', 'HISTORY_STATE_KEYS', 'is_history_state_key',
           'install_conv_taps']

_CHOICES = dict(fallback=('bn', 'naive'), concat=('compensate', 'fallback'),
                running_stats=('window', 'batch'),
                statistics_gradients=('closed_form', 'subsampled', 'autograd'))
# history_dtype, var_grad_dtype -> torch dtype (None: the statistics' precision)
_DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}

# the binding statuses the one-call training step handles (the codes of csrc/train_step.cpp)
_ONE_CALL_STATUS = {BindStatus.CONV: 0, BindStatus.FROZEN_CONV: 1, BindStatus.NOT_CONV: 2}
# whether this torch tells a checkpoint's first pass by a cheap query (else by stack frames)
_PASS_READABLE = saved_tensor_hooks_accessor() is not None

#: the state-dict key suffixes of a CBN layer beyond BN's (its history), e.g. for tools that drop it
HISTORY_STATE_KEYS = HISTORY_KEYS
#: whether a state-dict key is a CBN history tensor, the per-call ones (``call<i>_history_*``) included
is_history_state_key = CallHistories.is_key


class CrossIterationBatchNorm2d(_BatchNorm):
    r"""Cross-Iteration Batch Normalization over a 4-D input (Algorithm 1 of the paper).

    In training, the statistics of the current mini-batch are pooled with those of the ``window - 1``
    previous iterations, each moved to the current weights ``θ_t`` of the convolution that produced the
    input by a first-order Taylor step:

    .. math::
        μ_{t-τ}(θ_t) ≈ μ_{t-τ} + \frac{∂μ_{t-τ}}{∂θ^l}(θ^l_t - θ^l_{t-τ})  \quad (7)\qquad
        ν_{t-τ}(θ_t) ≈ ν_{t-τ} + \frac{∂ν_{t-τ}}{∂θ^l}(θ^l_t - θ^l_{t-τ})  \quad (8)

        \bar μ = \frac1k\sum_τ μ_{t-τ}(θ_t) \; (9) \qquad
        \bar ν = \frac1k\sum_τ \max[ν_{t-τ}(θ_t), μ_{t-τ}(θ_t)^2] \; (10) \qquad
        \bar σ^2 = \bar ν - \bar μ^2 \; (11)

        y = γ \frac{x - \bar μ}{\sqrt{\bar σ^2 + ε}} + β \quad (12)

    ``∂μ/∂θ`` and ``∂ν/∂θ`` use the closed forms of Appendix B (a mean input patch and one
    weight-gradient convolution per iteration); gradients flow only through the current iteration's
    statistics. The maths is evaluated in a centred, numerically stable form that is algebraically the
    same as Eqs. 7-11 (see :mod:`cbn_mmdet.ops.statistics`).

    The layer finds ``θ^l`` itself from the autograd graph of its input (see
    :mod:`cbn_mmdet.models.conv_binding`): no weight argument, no forked modules. When the input is not
    the direct output of a conv it can use, it takes a documented path and warns once:

    * conv weights frozen, or nothing upstream trainable: the weights cannot change, so the window
      statistics are used without compensation (Naive CBN), which is then exact;
    * a channel concatenation (DenseNet's pre-activation norms) with ``concat='compensate'``: the
      statistics are per channel, so each slice produced by a trainable conv (or by an
      average pool of a 1×1 conv, DenseNet's transitions) is compensated with that conv's weights
      exactly as above; the channels of other slices (a max-pooled stem) are used as recorded
      (Naive CBN for those channels; exact for frozen producers). See
      :mod:`cbn_mmdet.models.slice_history`. A concatenation without such a slice, or with
      ``concat='fallback'`` (default), takes ``fallback`` as a whole;
    * input from something else (an add, an activation, a norm-first block): ``fallback='bn'`` (default)
      normalises with the current batch like BN and leaves the history untouched; ``fallback='naive'``
      uses the window without compensation;
    * grad mode disabled in training mode: BN with the current batch, no history update.

    **Iterations.** The history advances once per optimizer step (:mod:`.iteration_clock`): calls
    between two steps (a shared head applied per FPN level, gradient-accumulation micro-batches) are
    normalised each with its own batch plus the past iterations, and are pooled into one history entry.

    **Running statistics.** ``running_stats='window'`` (default) updates them from the compensated
    window statistics used for normalising (variance unbiased with the window's number of values);
    ``'batch'`` from the current batch alone, like BN and the authors' code. Evaluation mode is exactly
    ``BatchNorm2d`` with the running statistics (``fuse_conv_bn`` folds it).

    **State.** The history is module state (moved by ``.to()``, in ``state_dict()``), created at the
    first recorded iteration, so BN checkpoints load strictly; it is not a buffer, so DDP and
    mmengine's ``SyncBuffersHook`` leave each process's history alone (see ``docs/design.md``).

    Args:
        num_features: ``C`` of an ``(N, C, H, W)`` input.
        eps: added to the variance inside the square root (Eq. 12). Default: 1e-5.
        momentum: running-statistics momentum as in BN (``None``: cumulative average). Default: 0.1.
        affine: learnable ``γ, β`` (Eq. 4). Default: True.
        track_running_stats: as in BN. Default: True.
        device, dtype: of the parameters and buffers, as in BN. Default: None.
        window: ``k``, the number of iterations averaged, the current one included; ``1`` is BN.
            Default: 4.
        compensate: Taylor compensation (Eqs. 7-8); ``False`` gives Naive CBN. Default: True.
        fallback: ``'bn'`` or ``'naive'``: what to do when the input does not come from a conv.
        concat: ``'fallback'`` (default) or ``'compensate'``: an input concatenated from several
            convs' outputs takes ``fallback`` as a whole, or is compensated slice by slice with the
            conv that produced each. Per step the latter costs one statistic-gradient product per
            (layer, compensated slice) and keeps a weight-sized ``∂var/∂θ`` per slice and entry;
            on a small DenseNet it trained worse than the fallback (docs/imagenet.md), hence the
            default.
        running_stats: ``'window'`` or ``'batch'`` (see above).
        statistics_gradients: ``'closed_form'`` (Appendix B, exact), ``'subsampled'`` (approximate:
            ``∂var/∂θ`` from every ``subsample``-th output row and column, ``subsample²`` times fewer
            multiply-adds for the layer's one extra weight-gradient convolution; ``∂μ/∂θ`` stays
            exact) or ``'autograd'`` (two extra autograd passes, the authors' method; a reference
            for tests and benchmarks).
        subsample: the row/column stride of ``'subsampled'``. Default: 2.
        history_dtype: storage of the past ``∂var/∂θ`` (the only weight-sized history):
            ``'float32'`` (default; float64 for a float64 layer) or ``'bfloat16'`` (half the memory;
            the Taylor term is computed in float32 from the rounded gradients, and the reference
            inner product from the same rounded values, so only the gradients' 8-bit mantissa
            rounding, relative 2⁻⁹, enters the correction).
        var_grad_dtype: operands of the ``∂var/∂θ`` product (the layer's one extra weight-gradient
            convolution): ``'float32'`` (default) or ``'bfloat16'`` (float32 accumulation, centred
            operands; faster where bfloat16 kernels are: CUDA, CPUs with AVX-512 BF16/AMX).
        per_call: ``0`` (default): the calls of one iteration (a head shared across FPN levels,
            micro-batches) pool into one entry; ``N``: the layer is applied ``N`` times per forward
            (e.g. a single-stage head once per level): the i-th call of an iteration is normalised
            with the i-th calls of the past iterations (``i`` modulo ``N``, so gradient-accumulation
            micro-batches pool per call). Not with activation checkpointing.
        monitor: record the relative size of the Taylor correction at each compensated forward in
            ``last_correction`` (a few small reductions, no host sync); ``CBNMonitorHook`` logs it.
        bias: keyword only, as in BN: ``False`` with ``affine`` learns ``γ`` and no ``β`` (needs a
            torch whose BatchNorm takes ``bias``). Default: True.

    Shape:
        Input and output ``(N, C, H, W)``.

    Example:
        >>> norm_cfg = dict(type='CBN', window=4)   # in any mmdet config
        >>> m = CrossIterationBatchNorm2d(64, window=4)
    """
    _version = HISTORY_VERSION  # torch's BN is 2; 3-5: the history's layouts (window_history.py)
    _abbr_ = 'bn'  # mmcv's build_norm_layer names it like BN (bn1, ...), so BN checkpoints match
    _option_owner = 'CBN'  # the layer's name in errors about its options
    _extra_options = ''  # options a subclass takes beyond these, for the unknown-option error

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 window: int = 4, compensate: bool = True, fallback: str = 'bn',
                 running_stats: str = 'window', statistics_gradients: str = 'closed_form',
                 subsample: int = 2, history_dtype: str = 'float32', var_grad_dtype: str = 'float32',
                 per_call: int = 0, monitor: bool = False, concat: str = 'fallback', *,
                 bias: bool = True, **unknown):
        owner = self._option_owner
        reject_unknown(owner, unknown, CrossIterationBatchNorm2d.__init__,
                       self._extra_options + ' (and requires_grad in norm_cfg)')
        _check_window('window', window, owner)
        require(is_real(eps) and eps > 0, owner, 'eps', 'a positive number', eps)
        require(momentum is None or is_real(momentum) and 0.0 <= momentum <= 1.0, owner, 'momentum',
                'None or a number in [0, 1]', momentum)
        for name, value in (('fallback', fallback), ('concat', concat),
                            ('running_stats', running_stats),
                            ('statistics_gradients', statistics_gradients)):
            require_choice(owner, name, value, _CHOICES[name])
        require_choice(owner, 'history_dtype', history_dtype, _DTYPES)
        require_choice(owner, 'var_grad_dtype', var_grad_dtype, _DTYPES)
        require(is_int(subsample) and subsample >= 2, owner, 'subsample', "an int >= 2 (the row/column "
                "stride of statistics_gradients='subsampled')", subsample)
        require(is_int(per_call) and per_call >= 0, owner, 'per_call', 'an int >= 0 (0: the calls of '
                'an iteration pool into one entry; N: a layer applied N times per forward, e.g. once '
                'per FPN level, keeps one history per call)', per_call)
        require_bool(owner, 'compensate', compensate)
        require_bool(owner, 'monitor', monitor)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **bn_bias_kwargs(owner, bias))
        self.window = window
        self.compensate = compensate
        self.fallback = fallback
        self.concat = concat
        self.running_stats = running_stats
        self.statistics_gradients = statistics_gradients
        self.subsample = subsample
        self.history_dtype = history_dtype
        self.var_grad_dtype = var_grad_dtype
        self._active_window = window
        # state, not buffers: DDP and SyncBuffersHook would overwrite the per-GPU history (docs/design.md)
        self.per_call = per_call
        self.call_histories = CallHistories(per_call, lambda: WindowHistory(
            num_features, self._slots, _DTYPES[history_dtype], self._warn_once))
        if per_call > 1 and self.track_running_stats:
            # running statistics per call as well: evaluation normalises the i-th call of a forward
            # (a level) with its own (call 0's are BN's running_mean/var)
            for call in range(1, per_call):
                for name in ('running_mean', 'running_var'):
                    self.register_buffer(CallHistories.key(call, name),
                                         getattr(self, name).detach().clone())
        self._eval_calls = 0  # calls since the last train()/eval(), for per_call in evaluation
        self.history = self.call_histories[0]  # the (first call's) past iterations
        self._producer = ConvProducer()
        # a concatenated input: the slices' producers and the per-slice histories of each call's ring
        self._concat_producer = ConcatProducer()
        self.slice_histories = ConcatHistories(per_call, lambda: SliceHistory(
            _DTYPES[history_dtype], self._warn_once))
        # the conv registered just before the layer, for traced forwards (see install_conv_taps)
        self._conv_tap: Optional[ConvTap] = None
        #: how the last training forward bound its input (a :class:`BindStatus` value), for reporting
        self.last_bind_status: Optional[str] = None
        #: with ``monitor=True``: size of the Taylor correction at the last compensated forward,
        #: ``{'mean': mean_τ,c |Δμ|/σ, 'var': mean_τ,c |Δvar|/var}`` over the window (0-d tensors)
        self.monitor = monitor
        self.last_correction: Optional[Dict[str, Tensor]] = None
        self._warned: set = set()

    # ------------------------------------------------------------------ settings
    @property
    def active_window(self) -> int:
        """Window used now (``≤ window``); burn-in hooks set it. ``1`` makes training plain BN."""
        return self._active_window

    @active_window.setter
    def active_window(self, value: int) -> None:
        _check_window('active_window', value, self._option_owner)
        if value > self.window:
            raise ValueError(f'{self._option_owner} active_window must be in [1, window={self.window}], '
                             f'got {value}')
        self._active_window = value

    def set_window(self, window: int) -> None:
        """Change ``k`` (the history capacity) in place, keeping the newest past iterations."""
        _check_window('window', window, self._option_owner)
        if window == self.window:
            return
        following = self._active_window == self.window
        self.window = window
        self._active_window = window if following else min(self._active_window, window)
        for history, slices in zip(self.call_histories, self.slice_histories):
            history.resize(self._slots, self._home_device())
            slices.resize(self._slots, self._home_device(), history)

    def extra_repr(self) -> str:
        extra = '' if self.history_dtype == 'float32' else f', history_dtype={self.history_dtype!r}'
        if self.statistics_gradients != 'closed_form':
            extra += f', statistics_gradients={self.statistics_gradients!r}'
        if self.var_grad_dtype != 'float32':
            extra += f', var_grad_dtype={self.var_grad_dtype!r}'
        if self.per_call:
            extra += f', per_call={self.per_call}'
        if self.concat != 'fallback':
            extra += f', concat={self.concat!r}'
        return (f'{super().extra_repr()}, window={self.window}, compensate={self.compensate}, '
                f'fallback={self.fallback!r}, running_stats={self.running_stats!r}{extra}')

    def _check_input_dim(self, input: Tensor) -> None:
        check_4d(self._option_owner, input)
        check_channels(self._option_owner, input, self.num_features)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` refuses the layer with an error that names the ways to deploy."""
        refuse_torchscript(self, 'its training forward (the binding to its conv through the '
                           'autograd graph, the history) is Python that TorchScript cannot '
                           'compile, and the conv before it carries a forward hook (its tap for '
                           'torch.compile) that TorchScript cannot compile either')

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        if self.training:
            output = self._one_call_step(input)
            if output is not None:
                return output
        self._check_input_dim(input)
        if not self.training:
            if self.per_call > 1 and self.running_mean is not None:
                call, self._eval_calls = self._eval_calls % self.per_call, self._eval_calls + 1
                mean, var = self._running_stats(call)
                return torch.batch_norm(input, self.weight, self.bias, mean, var, False, 0.0,
                                        self.eps, torch.backends.cudnn.enabled)
            return super().forward(input)  # exactly BN with the running statistics
        if self.concat == 'compensate' and self.window > 1 and is_compiling():
            self._refuse_traced_concat(input)  # at the first traced forward, burn-in included
        group = self._statistics_group()
        if self.window == 1 or self._active_window == 1:  # exactly BN, e.g. during burn-in
            if self.per_call > 1:
                self._call_history(self._autograd_pass())  # counts the call
            return self._batch_norm(input, group, update=True, call=self._call_index())
        state = self.running_mean if self.running_mean is not None else self.weight
        check_like_module(self._option_owner, input, state)
        if input.numel() == 0 and group is None:
            # e.g. a mask head with no positive RoI: nothing to measure, nothing to record (but the
            # call counts, so that the next call meets its own history)
            if self.per_call > 1 and torch.is_grad_enabled():
                self._call_history(self._autograd_pass())
            return torch.batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var,
                                    False, 0.0, self.eps, torch.backends.cudnn.enabled)
        if group is None:
            torch.nn.functional._verify_batch_size(input.size())

        # Only a pass whose saved tensors are readable updates the state; the first pass of an
        # activation checkpoint normalises the same way (same window, same weights) and leaves the
        # update to its recomputation in backward, so the state is updated once per forward.
        kind = self._autograd_pass()
        recording = kind == AutogradPass.RECORD
        if is_compiling():  # the autograd graph is the traced one: ask the conv
            binding, status, detail = self._traced_binding(input)
        else:
            binding, status, detail = self._producer.bind(input, kind)
            if status in (BindStatus.NOT_CONV, BindStatus.NO_GRAPH) and self.concat == 'compensate':
                binding, status, detail = self._concat_producer.bind(input, kind, binding, status,
                                                                     detail)
        self.last_bind_status = status
        history = self._call_history(kind)
        call = self._call_index()
        if status == BindStatus.CONCAT or self.slice_histories[call].layout is not None:
            history = self.slice_histories.view(history, call, status, binding, recording,
                                                self._slice_gradients)
        if self._explain_binding(kind, status, binding, detail):  # fallback='bn'
            return self._batch_norm(input, group, update=recording, call=call)
        compensating = self.compensate and binding is not None

        with torch.no_grad(), _autocast_disabled(input.device.type):
            history.advance()
            past = history.past(binding if compensating else None, input, self._active_window,
                                clamp=group is None)
            if self.monitor and past.compensated:
                self.last_correction = past.correction_size(self.eps)
            batch_mean, batch_var = batch_moments(input)
            count = float(input.shape[0] * input.shape[2] * input.shape[3])
            # before the normalisation saves its tensors (a checkpoint's recomputation may stop right
            # after that save): the running statistics and the record
            mean, var, inv_k, invstd, finite, pooled_count = self._window_statistics(
                group, past, batch_mean, batch_var, count, call, recording)
            if recording:
                self._record(history, input, batch_mean, batch_var, count, finite,
                             binding if compensating else None)
        return WindowBatchNormFunction.apply(input, self.weight, self.bias, mean, var, inv_k, self.eps,
                                             group, pooled_count, invstd)

    def _one_call_step(self, input: Tensor) -> Optional[Tensor]:
        """The steady state of an eager CPU training forward in two C++ calls (``csrc/train_step.cpp``:
        the same steps as below with the fused ops, and an autograd node of its own), or None where
        the rest of :meth:`forward` runs: the first forward of the layer, another binding than the
        last forward's, a second forward in an iteration, the first pass of an activation
        checkpoint (its recomputation is taken here), per_call, SyncCBN, monitor, the approximate
        statistic gradients, other dtypes and devices."""
        history = self.history
        status = _ONE_CALL_STATUS.get(self.last_bind_status)
        if (status is None or history.open and not history._stepped or history._stats is None
                or self.per_call > 1 or self.monitor or self.statistics_gradients != 'closed_form'
                # (a slow bfloat16 product is the Python forward's to warn of)
                or self.var_grad_dtype != 'float32' and not cpu_has_fast_bfloat16()
                or status == 2 and self.fallback == 'bn'
                # (a concatenation that was not compensable may become so: the Python forward
                # decides each time)
                or status == 2 and self.concat == 'compensate' or not _PASS_READABLE):
            return None
        ops = fused.one_call_ops()
        if (ops is None or is_compiling() or torch._C._get_tracing_state() is not None
                or autograd_pass() != AutogradPass.RECORD or self._statistics_group() is not None):
            return None
        # (from the dicts: nn.Module's attribute lookup of each would cost more than the checks)
        params, buffers = self._parameters, self._buffers
        if 'weight' not in params or 'bias' not in params:  # e.g. a parametrized γ
            return None
        running_mean = buffers['running_mean'] if self.track_running_stats else None
        tracks = running_mean is not None
        geometry = history.geometry
        weight, bias = params['weight'], params['bias']
        step = ops.train_step(
            input, weight, bias, history._stats, history._patches,
            history._grads, history._cursor, running_mean,
            buffers['running_var'] if tracks else None,
            buffers['num_batches_tracked'] if tracks else None,
            self._active_window, status, self.compensate,
            () if geometry is None or geometry[5] is None else geometry[:5] + (int(geometry[5]), ),
            -1.0 if self.momentum is None else self.momentum, self.running_stats == 'window',
            self.eps, statistics.UNFOLD_MAX_ELEMENTS, statistics.UNFOLD_MAX_POSITIONS,
            statistics.MATMUL_MAX_POSITIONS, self.var_grad_dtype == 'bfloat16')
        if step is None:
            return None
        mean, var, invstd, inv_k, valid, recorded, past_mean, past_var, weight_state = step
        history.recorded_in_one_call(self._active_window, weight_state,
                                     status == 0 and self.compensate, valid, recorded, past_mean,
                                     past_var)
        # (a call of its own: its saved tensors may end a checkpoint's recomputation, see above)
        return ops.normalise(input, weight, bias, mean, var, invstd, inv_k, self.eps)

    def _window_statistics(self, group, past: 'PastWindow', batch_mean: Tensor, batch_var: Tensor,
                           count: float, call: int, recording: bool):
        """Eqs. 9-11 and, when ``recording``, the running statistics: ``(μ̄, σ̄², 1/k, 1/sqrt(σ̄² + ε)
        or None, finite, the count of all processes' batches or None)``."""
        fused_ops = fused.applies(batch_mean) if group is None else None
        running = self._running_stats(call) if recording and self._tracks() else (None, None)
        if fused_ops is not None and (running[0] is None or running[0].dtype == batch_mean.dtype):
            # all of it in one pass (buffers in another precision, e.g. a .half() module: below)
            mean, var, invstd, inv_k, finite = fused_ops.window_step(
                batch_mean, batch_var, count, past.mean_ct, past.var_ct, past.valid, past.recorded,
                *running, None if running[0] is None else self.num_batches_tracked, call == 0,
                -1.0 if self.momentum is None else self.momentum, self.running_stats == 'window',
                self.eps)
            return mean, var, inv_k, invstd, finite, None
        # (a finite variance means finite values, hence a finite mean too)
        finite = finite_flag(batch_var)
        if group is None:
            w = WindowInput(batch_mean, batch_var, count, finite, past.mean_ct, past.var_ct,
                            past.valid, None)
        else:  # SyncCBN: the moments of all processes' batches
            w = self._pool_across(group, WindowInput(
                batch_mean, batch_var, count, finite, past.mean_ct, past.var_ct, past.valid,
                past.counts))
        mean, var, inv_k = window_statistics(w.batch_mean, w.batch_var, w.past_mean, w.past_var,
                                             w.past_valid)
        if recording:
            past_count = past.count if w.past_count is None else w.past_count
            self._update_running_stats(w.batch_mean, w.batch_var, mean, var, w.count, past_count,
                                       w.finite, call)
        return mean, var, inv_k, None, finite, None if group is None else w.count

    def _record(self, history: WindowHistory, input: Tensor, batch_mean: Tensor, batch_var: Tensor,
                count: float, finite: Tensor, binding) -> None:
        """The current iteration's entry (``binding``: the conv to compensate for, or None)."""
        if (self.var_grad_dtype == 'bfloat16' and binding is not None and input.device.type == 'cpu'
                and not cpu_has_fast_bfloat16()):  # (the default's forward compares one string)
            self._warn_once('slow_bf16_product', "var_grad_dtype='bfloat16' on a CPU without "
                            "oneDNN's bfloat16 kernels (no AVX-512): torch runs the product through "
                            'its slow reference kernel, several times slower than in float32; '
                            "var_grad_dtype='float32' is faster here")
        if count > 0:
            history.record(input, batch_mean, batch_var, count, finite, binding,
                           lambda defer_centring=False: conv_statistic_gradients(
                               binding.input, input, batch_mean, binding.weight, binding.bias,
                               binding.stride, binding.padding, binding.dilation, binding.groups,
                               self.statistics_gradients, self.subsample,
                               _DTYPES[self.var_grad_dtype], defer_centring))
        elif not history.open:  # an empty batch of SyncCBN: an empty entry keeps the ring in step
            history.record(input, batch_mean, batch_var, 0.0, finite, None, None)

    def _slice_gradients(self, binding, x: Tensor, batch_mean: Tensor, defer_centring: bool = False):
        """The statistic gradients of one compensated slice ``x`` of a concatenated input, with
        the conv that produced it (as :meth:`_record` for a single conv)."""
        return conv_statistic_gradients(
            binding.input, x, batch_mean, binding.weight, binding.bias, binding.stride,
            binding.padding, binding.dilation, binding.groups, self.statistics_gradients,
            self.subsample, _DTYPES[self.var_grad_dtype], defer_centring)

    def _tracks(self) -> bool:
        return self.track_running_stats and self.running_mean is not None

    def _call_history_open(self) -> bool:
        return any(h.open and not h._stepped for h in self.call_histories)

    @staticmethod
    def _autograd_pass() -> str:
        if is_compiling():
            # (activation checkpointing inside a compiled region is traced as one region)
            return AutogradPass.RECORD if torch.is_grad_enabled() else AutogradPass.NO_GRAD
        return autograd_pass()

    def _refuse_traced_concat(self, input: Tensor) -> None:
        """concat='compensate' finds a concatenation's slices in the autograd graph, which a traced
        forward does not have: refused unless the input is the tapped conv's output (the option
        does not apply there), rather than taking ``fallback`` where eager mode would compensate.

        With ``fullgraph=True`` the error reaches the caller. Otherwise torch.compile runs the
        frames around the layer eagerly instead of tracing them: the layer then compensates exactly
        as in eager mode when its slices' convs ran eagerly too, and refuses (:meth:`_explain_binding`,
        ``BindStatus.COMPILED``) when a slice comes from a compiled graph."""
        tap = self._conv_tap
        if tap is not None and tap.output is input:
            return
        raise RuntimeError(
            f"CBN({self.num_features}) concat='compensate' is eager-only: it finds the slices of a "
            'concatenated input in the autograd graph, which a forward traced by torch.compile does '
            'not have, and this input is not the output of a conv registered just before the layer. '
            "Under torch.compile set concat='fallback' (allowed: 'compensate', 'fallback'), or keep "
            'the module that concatenates and normalises eager (torch.compiler.disable on its '
            'forward).')

    def _traced_binding(self, input: Tensor):
        """The conv binding of a forward traced by ``torch.compile``, from the conv tap."""
        if self._conv_tap is None:
            return None, BindStatus.NOT_CONV, ('under torch.compile, no 2-D conv with this number of '
                                               'output channels registered just before the layer '
                                               'in its parent module')
        return self._conv_tap.bind(input)

    # ------------------------------------------------------------------ across processes (SyncCBN)
    def _statistics_group(self):
        """The process group whose batches are normalised together; None: this process's batch."""
        return None

    def _pool_across(self, group, local: 'WindowInput') -> 'WindowInput':
        raise NotImplementedError  # SyncCBN's; CBN's group is always None

    def _batch_norm(self, input: Tensor, group, update: bool, call: int = 0) -> Tensor:
        """Normalise with the current batch like BN; ``update``: also the (call's) running
        statistics."""
        if update and call == 0:
            return super().forward(input)
        if update and self.running_mean is not None:  # BN's training step on the call's statistics
            # (counted at call 0: every call then sees the count a layer of its own would have)
            factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                      else self.momentum)
            mean, var = self._running_stats(call)
            return torch.batch_norm(input, self.weight, self.bias, mean, var, True, factor, self.eps,
                                    torch.backends.cudnn.enabled)
        return torch.batch_norm(input, self.weight, self.bias, None, None, True, 0.0, self.eps,
                                torch.backends.cudnn.enabled)

    def _call_index(self) -> int:
        """Which call of the iteration this is (0 without ``per_call``); see :class:`CallHistories`."""
        return self.call_histories.current if self.per_call > 1 else 0

    def _running_stats(self, call: int):
        """The running mean and variance of the ``call``-th call (BN's for call 0)."""
        return (getattr(self, CallHistories.key(call, 'running_mean')),
                getattr(self, CallHistories.key(call, 'running_var')))

    def train(self, mode: bool = True):
        self._eval_calls = 0  # per_call counts the calls of each evaluation forward from here
        return super().train(mode)

    def _call_history(self, kind: str) -> WindowHistory:
        """This call's history (see :class:`CallHistories`)."""
        if self.per_call <= 1:
            return self.history
        if kind != AutogradPass.RECORD:
            raise RuntimeError(
                f'CBN({self.num_features}) per_call={self.per_call} tells calls apart by their order in '
                'the iteration; activation checkpointing and training forwards without autograd '
                'change that order, so they are not supported with per_call (use per_call=0, or '
                'train this part without checkpointing)')
        return self.call_histories.next_call()

    def _explain_binding(self, kind: str, status: str, binding, detail: str) -> bool:
        """Say once what the layer does when it cannot compensate; True: normalise like BN."""
        if status == BindStatus.COMPILED:
            why = ('it is the second training forward of this iteration (gradient accumulation, or a '
                   'shared head without per_call), which pools into the entry of the iteration: '
                   'only eager mode does that; compile without such layers, or set per_call to the '
                   'number of calls' if self._call_history_open() else
                   'torch.compile could not trace the layer, or compiled only the conv (a graph '
                   'break between them, torch.compiler.disable on the layer); compile the module '
                   'holding conv and CBN as one, or keep both eager')
            if self.concat == 'compensate':
                why += ("; with concat='compensate' torch.compile runs the module around a layer "
                        'whose input is a concatenation eagerly (the slices are found in the eager '
                        "autograd graph): under torch.compile set concat='fallback' (allowed: "
                        "'compensate', 'fallback')")
            raise RuntimeError(
                f'CBN({self.num_features}) runs eagerly with its input from a torch.compile graph '
                f'({detail}), so it cannot see the conv whose weights it compensates for: {why}.')
        if status == BindStatus.NOT_CONV and self.fallback == 'bn':
            self._warn_once(status, f'input is not the output of a trainable conv ({detail}); '
                            "normalising with the current batch like BN (fallback='bn'), "
                            'history not updated')
            return True
        if status == BindStatus.NOT_CONV:
            self._warn_once(status, f'input is not the output of a conv ({detail}); using the window '
                            "without compensation (fallback='naive')")
        elif status == BindStatus.FROZEN_CONV:
            self._warn_once(status, 'its conv has frozen weights (or nothing upstream is trainable): '
                            'the window is used without compensation, exact since those weights '
                            'cannot change')
        elif kind == AutogradPass.NO_GRAD and binding is not None and binding.parameters is None:
            self._warn_once('stale_weights', 'its conv weight is computed from parameters (e.g. '
                            'weight standardisation) and this pass has no autograd graph: the window '
                            "is compensated to the weight of this layer's last recorded forward")
        elif status == BindStatus.NO_GRAPH and self.history.filled > 0:
            self._warn_once(status, 'a training forward without autograd before any forward with it '
                            '(e.g. reentrant checkpointing right after loading a checkpoint): this '
                            'iteration uses the past statistics without compensation')
        if status == BindStatus.CONCAT and binding.as_recorded and self.compensate:
            self._warn_once(status, f'input is a concatenation ({detail}); the slices from trainable '
                            'convs are compensated with them, the channels as recorded use the '
                            "window without compensation (concat='fallback' normalises all of "
                            'them as fallback says)')
        return False

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            if is_compiling():  # (a warning would break the graph being traced)
                iteration_clock.warn_at_step(f'CBN({self.num_features}): {message}.')
            else:
                warnings.warn(f'CBN({self.num_features}): {message}.', CBNWarning, stacklevel=3)

    # ------------------------------------------------------------------ running statistics
    def _update_running_stats(self, batch_mean: Tensor, batch_var: Tensor, mean: Tensor, var: Tensor,
                              count, past_count: Tensor, finite: Tensor, call: int = 0) -> None:
        # count: the batch's number of values, a float, or a 0-d tensor when pooled across processes
        if not self._tracks():
            return
        if call == 0:  # with per_call, every call then sees the count a layer of its own would have
            # a batch with non-finite moments is not averaged in, so it is not counted either
            self.num_batches_tracked.add_(finite)
        factor = running_factor(self.momentum, self.num_batches_tracked, self.running_mean.dtype)
        if self.running_stats == 'window':
            # unbiased with the window's number of values n: var·n/(n − 1) = var + var/(n − 1)
            values_less_one = (past_count + (count - 1.0)).clamp_min_(1.0)
            unbiased = torch.addcdiv(var, var, values_less_one)
            new_mean = mean
        else:
            unbiased = batch_var * (count / ((count - 1.0).clamp_min(1.0) if torch.is_tensor(count)
                                             else max(count - 1.0, 1.0)))
            new_mean = batch_mean
        # (BN would write non-finite statistics into them)
        update_running_(self._running_stats(call), (new_mean, unbiased), finite, factor)

    # ------------------------------------------------------------------ history
    # ``self.history`` (a :class:`WindowHistory`) is the public view of the past iterations.
    @property
    def history_length(self) -> int:
        """Iterations held (at most ``window - 1``), the current one included once it has run."""
        return self.history.filled

    @property
    def history_open(self) -> bool:
        """Whether the newest entry belongs to the current iteration (no optimizer step since)."""
        return self.history.open

    @property
    def _slots(self) -> int:
        return max(self.window - 1, 1)

    def reset_history(self) -> None:
        """Forget all past iterations (the next forward is BN on its batch)."""
        self.call_histories.reset()
        self.slice_histories.reset()
        self._producer = ConvProducer()
        self._concat_producer = ConcatProducer()

    def past_window(self, call: int = 0) -> Optional[Dict[str, Tensor]]:
        """The past iterations of the current iteration's window (for analysis and tests).

        ``{'mean', 'var'}``: as recorded; ``{'mean_compensated', 'var_compensated'}``: moved to the
        current weights (Eqs. 7, 8, 10; equal to the recorded ones without compensation); ``'valid'``:
        1 for the entries in the window; ``'count'``: their number of values. Indexed like the ring
        (``history.slots_newest_first()``). ``None`` when the current iteration used no past entry.
        ``call``: with ``per_call``, which call's history.
        """
        past = self.slice_histories[call].last_window(self.call_histories[call])
        if past is None:
            return None
        return {'mean': past.recorded_mean, 'var': past.recorded_var, 'mean_compensated': past.mean,
                'var_compensated': past.var, 'valid': past.valid, 'count': past.count}

    # ------------------------------------------------------------------ state dict, device moves
    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        for history, slices in zip(self.call_histories, self.slice_histories):
            history.apply(fn)
            slices.apply(fn, history)
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for key, t in self.call_histories.state().items():
            destination[prefix + key] = t if keep_vars else t.detach()
        for key, t in self.slice_histories.state().items():
            destination[prefix + key] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {prefix + key for key in self.call_histories.keys()}
        keys.update(key for key in state_dict
                    if key.startswith(prefix) and self.slice_histories.owns(key[len(prefix):]))
        loaded = {key[len(prefix):]: state_dict[key] for key in keys if key in state_dict}
        self.reset_history()  # a checkpoint without history (e.g. BN's) starts an empty window
        # torch's loader sees neither our history keys nor our (now empty) history buffers
        rest = {k: v for k, v in state_dict.items() if k not in keys}
        for call in range(1, self.per_call if self.running_mean is not None else 0):
            for name in ('running_mean', 'running_var'):
                # a checkpoint with one set (BN's, a pooled CBN's): every call starts from it
                if prefix + CallHistories.key(call, name) not in rest and prefix + name in rest:
                    rest[prefix + CallHistories.key(call, name)] = rest[prefix + name]
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        try:
            version = local_metadata.get('version') or self._version
            self.call_histories.load(loaded, version, self._home_device())
            self.slice_histories.load(loaded, version, self._home_device(), self.call_histories)
        except ValueError as err:
            error_msgs.append(f'{prefix[:-1] or "CBN"}: {err}')
            self.reset_history()

    def _home_device(self) -> torch.device:
        for tensor in (self.running_mean, self.weight):
            if tensor is not None:
                return tensor.device
        return torch.device('cpu')


class WindowInput(NamedTuple):
    """What the window statistics (Eqs. 9-11) are computed from."""
    batch_mean: Tensor      # (C,) the current iteration's batch
    batch_var: Tensor
    count: float            # its number of values
    finite: Tensor          # () whether its moments are finite
    past_mean: Tensor       # (C, T) compensated past entries, Eq. 10 applied
    past_var: Tensor
    past_valid: Tensor      # (T,) 1 for the entries in the window
    past_count: Optional[Tensor]  # their number of values: () pooled, (T,) by entry, None: ask
                                  # the history


_taps = weakref.WeakKeyDictionary()  # conv -> hook handle of its tap


def _tap_preceding_conv(parent: torch.nn.Module, name: str, child) -> None:
    """Module registration hook: a CBN layer registered just after a conv with its number of
    output channels (mmcv's ``ConvModule``, ResNet blocks, ``nn.Sequential``, BN layers converted
    in place) gets a tap on that conv, so that a traced forward can compensate (see
    :class:`ConvTap`; eager forwards find their conv from the autograd graph and ignore it)."""
    if not isinstance(child, CrossIterationBatchNorm2d):
        return None
    conv = preceding_conv(parent, name)
    if conv is None or conv.out_channels != child.num_features:
        return None
    if conv in _taps:  # one tap per conv: the layer registered last is the one it feeds
        _taps.pop(conv).remove()
    tap = ConvTap(conv)
    _taps[conv] = conv.register_forward_hook(tap)
    child._conv_tap = tap
    return None


_tap_hook = None


def install_conv_taps() -> None:
    """Tap the conv before each CBN layer as modules are registered (idempotent; ``import
    cbn_mmdet`` calls it; a global module registration hook that acts on CBN layers only)."""
    global _tap_hook
    if _tap_hook is None:
        _tap_hook = torch.nn.modules.module.register_module_module_registration_hook(
            _tap_preceding_conv)


@functools.lru_cache(maxsize=None)
def cpu_has_fast_bfloat16() -> bool:
    """Whether torch runs bfloat16 convolutions on this CPU through oneDNN (CPUs with AVX-512);
    elsewhere it takes its slow reference kernels."""
    probe = getattr(torch.ops.mkldnn, '_is_mkldnn_bf16_supported', None)
    try:
        return bool(torch.backends.mkldnn.is_available() and probe is not None and probe())
    except RuntimeError:  # (an op that this torch build does not have)
        return False


def _check_window(name: str, value, owner: str = 'CBN') -> None:
    require(is_int(value) and value >= 1, owner, name, 'a positive int (1 = plain BN, paper: 4 on '
            'COCO, min(ceil(16 / images per GPU), 8) in general)', value)


def _autocast_disabled(device_type: str):
    """The statistics and the Taylor terms are computed in float32 also inside ``torch.autocast``:
    the correction is a small difference of large inner products, mostly rounding noise in 16 bits."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return contextlib.nullcontext()  # (entering autocast costs more than this check)
    except TypeError:  # torch < 2.4 asks per device type differently: enter the context anyway
        pass
    try:
        return torch.autocast(device_type=device_type, enabled=False)
    except RuntimeError:  # a device type without autocast
        return contextlib.nullcontext()
