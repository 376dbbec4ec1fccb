"""Cross-Iteration Batch Normalization (Yao et al., CVPR 2021), a drop-in ``_BatchNorm``."""
import warnings
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.statistics import (compensate_history, linear_term_mean, linear_term_var, merge_gradients,
                              merge_moments, patch_mean, statistic_gradients_autograd,
                              variance_weight_gradient)
from ..ops.window_norm import window_batch_norm
from . import iteration_clock
from .conv_binding import BindStatus, ConvBinding, find_conv_producer

__all__ = ['CrossIterationBatchNorm2d']

_FALLBACKS = ('bn', 'naive')
_RUNNING_STATS = ('window', 'batch')
_STAT_GRADIENTS = ('closed_form', 'autograd')

# History buffers, created lazily at the first recorded iteration (so that a fresh CBN has exactly BN's
# state-dict keys and a BN checkpoint loads with strict=True). Leading dimension: the window's ring slots.
_HISTORY_STATS = ('history_mean', 'history_var', 'history_count', 'history_mean_ref',
                  'history_var_ref', 'history_compensable')
_HISTORY_GRADS = ('history_patch_mean', 'history_var_grad')
_HISTORY_INDEX = 'history_index'  # long [head slot, number of past iterations held, pending entry open]
_HISTORY_BUFFERS = _HISTORY_STATS + _HISTORY_GRADS + (_HISTORY_INDEX, )


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
    * input from something else (an add, an activation, a norm-first block): ``fallback='bn'`` (default)
      normalises with the current batch like BN and leaves the history untouched; ``fallback='naive'``
      uses the window without compensation;
    * grad mode disabled in training mode: BN with the current batch, no history update.

    **Iterations.** The history advances once per optimizer step (:mod:`.iteration_clock`): calls
    between two steps (a shared head applied per FPN level, gradient-accumulation micro-batches) are
    normalised each with its own batch plus the past iterations, and are pooled into one history entry.

    **Running statistics.** With ``running_stats='window'`` (default) the running mean/variance are
    updated from the window statistics used for normalising (compensated, so they estimate the
    population under the current weights from ``k`` iterations), the variance made unbiased with the
    window's total number of values; ``'batch'`` updates them from the current batch alone, like BN and
    the authors' code. Evaluation mode is exactly ``BatchNorm2d`` with the running statistics, so
    ``fuse_conv_bn`` folds it into the conv.

    **State.** The history is module state: moved by ``.to()``, saved in ``state_dict()`` and restored
    by ``load_state_dict()``. It is created at the first recorded iteration, so a fresh CBN has BN's
    keys and BN checkpoints load strictly (history empty). It is not in ``buffers()``, so DDP's
    ``broadcast_buffers`` and mmengine's ``SyncBuffersHook`` leave each process's history alone (they
    still broadcast/average the running statistics, as for BN).

    Args:
        num_features: ``C`` of an ``(N, C, H, W)`` input.
        eps: added to the variance inside the square root (Eq. 12). Default: 1e-5.
        momentum: running-statistics momentum as in BN (``None``: cumulative average). Default: 0.1.
        affine: learnable ``γ, β`` (Eq. 4). Default: True.
        track_running_stats: as in BN. Default: True.
        window: ``k``, the number of iterations averaged, the current one included; ``1`` is BN.
            Default: 4.
        compensate: Taylor compensation (Eqs. 7-8); ``False`` gives Naive CBN. Default: True.
        fallback: ``'bn'`` or ``'naive'``: what to do when the input does not come from a conv.
        running_stats: ``'window'`` or ``'batch'`` (see above).
        statistics_gradients: ``'closed_form'`` (Appendix B) or ``'autograd'`` (two extra autograd
            passes, the authors' method; a reference for tests and benchmarks).
        monitor: record the relative size of the Taylor correction at each compensated forward in
            ``last_correction`` (a few small reductions, no host sync); ``CBNMonitorHook`` logs it.

    Shape:
        Input and output ``(N, C, H, W)``.

    Example:
        >>> norm_cfg = dict(type='CBN', window=4)   # in any mmdet config
        >>> m = CrossIterationBatchNorm2d(64, window=4)
    """
    _version = 3  # 2: torch's BatchNorm (num_batches_tracked); 3: + CBN history buffers (lazy)
    _abbr_ = 'bn'  # mmcv's build_norm_layer names it like BN (bn1, ...), so BN checkpoints match

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, window: int = 4,
                 compensate: bool = True, fallback: str = 'bn', running_stats: str = 'window',
                 statistics_gradients: str = 'closed_form', monitor: bool = False, device=None,
                 dtype=None, **unknown):
        if unknown:
            raise TypeError(
                f'CBN got unknown option(s) {sorted(unknown)}; allowed: num_features, eps, momentum, '
                'affine, track_running_stats, window, compensate, fallback, running_stats, '
                'statistics_gradients, monitor (and requires_grad in norm_cfg)')
        _check_window('window', window)
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise ValueError(f'CBN eps must be a positive number, got {eps!r}')
        if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, (int, float))
                                     or not 0.0 <= momentum <= 1.0):
            raise ValueError(f'CBN momentum must be None or a number in [0, 1], got {momentum!r}')
        for name, value, allowed in (('fallback', fallback, _FALLBACKS),
                                     ('running_stats', running_stats, _RUNNING_STATS),
                                     ('statistics_gradients', statistics_gradients, _STAT_GRADIENTS)):
            if value not in allowed:
                raise ValueError(f'CBN {name} must be one of {allowed}, got {value!r}')
        for name, value in (('compensate', compensate), ('monitor', monitor)):
            if not isinstance(value, bool):
                raise TypeError(f'CBN {name} must be True or False, got {value!r}')
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype)
        self.window = window
        self.compensate = compensate
        self.fallback = fallback
        self.running_stats = running_stats
        self.statistics_gradients = statistics_gradients
        self._active_window = window
        # The history is state (saved, loaded, moved by .to()) but deliberately not registered as
        # buffers: DDP's broadcast_buffers and mmengine's SyncBuffersHook operate on buffers(), and
        # would overwrite or average the per-GPU history across processes.
        self._history: Dict[str, Tensor] = {}
        self._reset_history_mirror()
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
        _check_window('active_window', value)
        if value > self.window:
            raise ValueError(f'CBN active_window must be in [1, window={self.window}], got {value}')
        self._active_window = value

    def set_window(self, window: int) -> None:
        """Change ``k`` (the history capacity) in place, keeping the newest past iterations."""
        _check_window('window', window)
        if window == self.window:
            return
        held = dict(self._history)
        following = self._active_window == self.window
        self.window = window
        self._active_window = window if following else min(self._active_window, window)
        clock = self._pending_clock
        self.reset_history()
        if held:
            self._restore_history(held)
            self._pending_clock = clock  # same process: the open entry is still this iteration's

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, window={self.window}, compensate={self.compensate}, '
                f'fallback={self.fallback!r}, running_stats={self.running_stats!r}')

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() != 4:
            raise ValueError(f'CBN expects 4D (N, C, H, W) input (got {input.dim()}D input)')

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training or self.window == 1 or self._active_window == 1:
            return super().forward(input)  # exactly BN: eval with running stats, or burn-in
        self._check_input_like_module(input)
        if input.numel() == 0:
            # e.g. a mask head with no positive RoI: nothing to measure, nothing to record
            return torch.batch_norm(input, self.weight, self.bias, self.running_mean, self.running_var,
                                    False, 0.0, self.eps, torch.backends.cudnn.enabled)
        torch.nn.functional._verify_batch_size(input.size())

        binding, status, detail = self._bind(input)
        self.last_bind_status = status
        if status in (BindStatus.NO_GRAPH, BindStatus.NOT_CONV):
            grad_off = not torch.is_grad_enabled()
            if grad_off or self.fallback == 'bn':
                self._warn_once(status, f'input is not the output of a trainable conv ({detail}); '
                                'normalising with the current batch like BN' +
                                ('' if grad_off else " (fallback='bn')") + ', history not updated')
                return super().forward(input)
            self._warn_once(status, f'input is not the output of a conv ({detail}); using the window '
                            "without compensation (fallback='naive')")
        elif status == BindStatus.FROZEN_CONV:
            self._warn_once(status, 'its conv has frozen weights (or nothing upstream is trainable): '
                            'the window is used without compensation, exact since those weights '
                            'cannot change')
        compensating = self.compensate and binding is not None

        with torch.no_grad():
            self._advance_iteration()
            past_mean, past_var, past_valid, past_count = self._past_statistics(
                binding if compensating else None, input)
        y, batch_mean, batch_var, mean, var, k = window_batch_norm(
            input, self.weight, self.bias, past_mean, past_var, past_valid, self.eps)
        with torch.no_grad():
            count = float(input.shape[0] * input.shape[2] * input.shape[3])
            finite = torch.isfinite(batch_mean).all() & torch.isfinite(batch_var).all()
            self._update_running_stats(batch_mean, batch_var, mean, var, count, past_count, finite)
            self._record(input, batch_mean, batch_var, count, finite, binding if compensating else None)
        return y

    def _bind(self, input: Tensor) -> Tuple[Optional[ConvBinding], str, str]:
        if not torch.is_grad_enabled():
            return None, BindStatus.NO_GRAPH, 'grad mode disabled'
        if input.grad_fn is None:
            # grad mode on but nothing upstream requires grad: every weight before us is fixed
            return None, BindStatus.FROZEN_CONV, 'nothing upstream is trainable'
        return find_conv_producer(input)

    def _check_input_like_module(self, input: Tensor) -> None:
        ref = self.running_mean if self.running_mean is not None else self.weight
        if ref is None:
            return
        if input.device != ref.device:
            raise RuntimeError(f'CBN input is on {input.device} but the layer is on {ref.device}')
        low_precision = input.dtype in (torch.float16, torch.bfloat16) and ref.dtype == torch.float32
        if input.dtype != ref.dtype and not low_precision:
            raise TypeError(f'CBN input dtype {input.dtype} does not match the layer dtype {ref.dtype} '
                            '(allowed: the same dtype, or float16/bfloat16 input with a float32 layer)')

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f'CBN({self.num_features}): {message}.', stacklevel=3)

    # ------------------------------------------------------------------ running statistics
    def _update_running_stats(self, batch_mean: Tensor, batch_var: Tensor, mean: Tensor, var: Tensor,
                              count: float, past_count: Tensor, finite: Tensor) -> None:
        if not self.track_running_stats or self.running_mean is None:
            return
        self.num_batches_tracked.add_(1)
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
        if self.running_stats == 'window':
            new_mean, new_var, n = mean, var, past_count + count
        else:
            new_mean, new_var, n = batch_mean, batch_var, torch.as_tensor(count, device=mean.device)
        unbiased = new_var * (n / (n - 1.0).clamp_min(1.0))
        rm = torch.lerp(self.running_mean, new_mean.to(self.running_mean.dtype), factor)
        rv = torch.lerp(self.running_var, unbiased.to(self.running_var.dtype), factor)
        # non-finite statistics never enter the running stats (BN would write NaN into them)
        self.running_mean.copy_(torch.where(finite, rm, self.running_mean))
        self.running_var.copy_(torch.where(finite, rv, self.running_var))

    # ------------------------------------------------------------------ history
    def reset_history(self) -> None:
        """Forget all past iterations (the next forward is BN on its batch)."""
        self._history = {}
        self._reset_history_mirror()

    def _reset_history_mirror(self) -> None:
        self._head = 0            # ring slot of the current iteration's entry
        self._filled = 0          # past iterations held (≤ window - 1)
        self._pending_open = False  # the current iteration's entry has been written
        self._pending_clock: Optional[int] = None  # iteration clock when that entry was opened
        self._geometry: Optional[Tuple[int, ...]] = None

    def _write_index(self) -> None:
        self.history_index.copy_(torch.tensor([self._head, self._filled, int(self._pending_open)]))

    @property
    def history_length(self) -> int:
        """Number of past iterations currently held (at most ``window - 1``)."""
        return self._filled

    def _advance_iteration(self) -> None:
        """Close the current iteration's entry when the optimizer has stepped since it was opened."""
        clock = iteration_clock.current_iteration()
        if self._pending_open and clock != self._pending_clock:
            self._head = (self._head + 1) % self.window
            self._filled = min(self._filled + 1, self.window - 1)
            self._pending_open = False
            self.history_count[self._head] = 0
            self.history_compensable[self._head] = 0
            self._write_index()
        self._pending_clock = clock

    def _past_statistics(self, binding: Optional[ConvBinding], input: Tensor):
        """Compensated (Eqs. 7, 8, 10) statistics of the past iterations in the active window."""
        c = self.num_features
        if self.history_mean is None:
            empty = input.new_zeros((0, c), dtype=torch.float64 if input.dtype == torch.float64
                                    else torch.float32)
            return empty, empty, empty.new_zeros(0), empty.new_zeros(())
        in_window = [0.0] * self.window
        for tau in range(1, min(self._filled, self._active_window - 1) + 1):
            in_window[(self._head - tau) % self.window] = 1.0
        valid = (torch.tensor(in_window, dtype=self.history_count.dtype).to(self.history_count.device)
                 * (self.history_count > 0))
        past_count = (self.history_count * valid).sum()
        mean, var = self.history_mean, self.history_var
        if binding is not None and self.history_patch_mean is not None and \
                self._geometry == binding.geometry:
            mean, var = compensate_history(
                mean, var, self.history_mean_ref, self.history_var_ref, self.history_patch_mean,
                self.history_var_grad, self.history_compensable, binding.weight, binding.bias,
                binding.groups)
            if self.monitor:
                self.last_correction = self._correction_size(mean, var, valid)
        return mean, var, valid, past_count

    def _correction_size(self, mean: Tensor, var: Tensor, valid: Tensor) -> Dict[str, Tensor]:
        """How far Eqs. 7-8 moved the window's past statistics, relative to their scale (no sync)."""
        scale = (self.history_var + self.eps).sqrt()
        weights = valid.unsqueeze(1) / (valid.sum() * self.num_features).clamp_min(1.0)
        rel_mean = ((mean - self.history_mean).abs() / scale * weights).sum()
        rel_var = ((var - self.history_var).abs() / (self.history_var + self.eps) * weights).sum()
        return {'mean': rel_mean, 'var': rel_var}

    def _allocate_history(self, like: Tensor, binding: Optional[ConvBinding]) -> None:
        k, c = self.window, self.num_features
        dtype = torch.float64 if like.dtype == torch.float64 else torch.float32
        if self.history_mean is None:
            for name in _HISTORY_STATS:
                self._history[name] = torch.zeros((k, c) if name not in (
                    'history_count', 'history_compensable') else (k, ), dtype=dtype, device=like.device)
            self._history[_HISTORY_INDEX] = torch.zeros(3, dtype=torch.long, device=like.device)
            self._write_index()
        if binding is not None and self._geometry != binding.geometry:
            if self._geometry is not None:
                self._warn_once('geometry', 'its conv changed shape; past gradients are discarded')
                self.history_compensable.zero_()
            c_out, c_in, kh, kw, groups = binding.geometry
            self._history['history_patch_mean'] = torch.zeros((k, c_in, kh, kw), dtype=dtype,
                                                              device=like.device)
            self._history['history_var_grad'] = torch.zeros((k, c_out, c_in // groups, kh, kw),
                                                            dtype=dtype, device=like.device)
            self._geometry = binding.geometry

    def _statistic_gradients(self, input: Tensor, batch_mean: Tensor,
                             b: ConvBinding) -> Tuple[Tensor, Tensor]:
        """``(∂μ/∂θ as a (C_in, kh, kw) patch mean, ∂var/∂θ)`` of the current batch."""
        if self.statistics_gradients == 'autograd':
            d_mean, d_second = statistic_gradients_autograd(b.input, b.weight, b.bias, b.stride,
                                                            b.padding, b.dilation, b.groups)
            c_out, c_in_g, kh, kw = d_mean.shape
            patch = d_mean.reshape(b.groups, c_out // b.groups, c_in_g, kh, kw)[:, 0].reshape(
                -1, kh, kw)
            return patch, d_second - 2.0 * batch_mean.to(d_mean.dtype).view(-1, 1, 1, 1) * d_mean
        kh, kw = b.weight.shape[2:]
        patch = patch_mean(b.input, (kh, kw), input.shape[2:], b.stride, b.padding, b.dilation)
        var_grad = variance_weight_gradient(b.input, input, batch_mean, b.weight, b.stride, b.padding,
                                            b.dilation, b.groups)
        return patch, var_grad

    def _record(self, input: Tensor, batch_mean: Tensor, batch_var: Tensor, count: float,
                finite: Tensor, binding: Optional[ConvBinding]) -> None:
        """Write (or pool into) the current iteration's history entry."""
        self._allocate_history(input, binding)
        slot = self._head
        dtype = self.history_mean.dtype
        new_count = finite.to(dtype) * count
        new_mean = torch.where(finite, batch_mean, 0.0).to(dtype)
        new_var = torch.where(finite, batch_var, 0.0).to(dtype)
        if self._pending_open:
            old_count = self.history_count[slot]
            share_old = torch.where(old_count + new_count > 0,
                                    old_count / (old_count + new_count).clamp_min(1e-12), 1.0)
            old_mean = self.history_mean[slot].clone()
            pooled_count, pooled_mean, pooled_var = merge_moments(
                old_count, old_mean, self.history_var[slot], new_count, new_mean, new_var)
        else:
            pooled_count, pooled_mean, pooled_var = new_count, new_mean, new_var
        self.history_count[slot] = pooled_count
        self.history_mean[slot] = pooled_mean
        self.history_var[slot] = pooled_var

        if binding is None or self._geometry != binding.geometry:
            self.history_compensable[slot] = 0
        else:
            patch, var_grad = self._statistic_gradients(input, batch_mean, binding)
            patch = torch.where(finite, patch.to(dtype), 0.0)
            var_grad = torch.where(finite, var_grad.to(dtype), 0.0)
            if self._pending_open:
                patch, var_grad = merge_gradients(
                    share_old, old_mean, self.history_patch_mean[slot], self.history_var_grad[slot],
                    new_mean, patch, var_grad, pooled_mean, binding.groups)
                compensable = self.history_compensable[slot]
            else:
                compensable = torch.ones((), dtype=dtype, device=input.device)
            self.history_patch_mean[slot] = patch
            self.history_var_grad[slot] = var_grad
            # the linear terms of Eqs. 7-8 at θ_{t} (this iteration's weights), kept instead of θ_t
            self.history_mean_ref[slot] = linear_term_mean(patch[None], binding.weight, binding.bias,
                                                           binding.groups)[0]
            self.history_var_ref[slot] = linear_term_var(var_grad[None], binding.weight)[0]
            self.history_compensable[slot] = compensable
        if not self._pending_open:
            self._pending_open = True
            self._write_index()

    # ------------------------------------------------------------------ state dict, device moves
    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self._history = {name: fn(t) for name, t in self._history.items()}
        return module

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in _HISTORY_BUFFERS:
            if name in self._history:
                t = self._history[name]
                destination[prefix + name] = t if keep_vars else t.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        keys = {prefix + name for name in _HISTORY_BUFFERS}
        loaded: Dict[str, Tensor] = {name: state_dict[prefix + name] for name in _HISTORY_BUFFERS
                                     if prefix + name in state_dict}
        self.reset_history()  # a checkpoint without history (e.g. BN's) starts an empty window
        # torch's loader sees neither our history keys nor our (now empty) history buffers
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in keys}, prefix,
                                      local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if loaded:
            try:
                self._restore_history(loaded)
            except ValueError as err:
                error_msgs.append(f'{prefix[:-1] or "CBN"}: {err}')
                self.reset_history()

    def _home_device(self) -> torch.device:
        for tensor in (self.running_mean, self.weight):
            if tensor is not None:
                return tensor.device
        return torch.device('cpu')

    def _restore_history(self, loaded: Dict[str, Tensor]) -> None:
        needed = set(_HISTORY_STATS) | {_HISTORY_INDEX}
        if not needed <= set(loaded):
            raise ValueError(f'incomplete CBN history in checkpoint (missing '
                             f'{sorted(needed - set(loaded))})')
        head, filled, pending = (int(v) for v in loaded[_HISTORY_INDEX].tolist())
        slots = loaded['history_mean'].shape[0]
        if loaded['history_mean'].shape[1] != self.num_features:
            raise ValueError(f"CBN history has {loaded['history_mean'].shape[1]} channels, layer has "
                             f'{self.num_features}')
        # Same window: slots as saved. Another window: re-pack the ring by age (the newest kept).
        keep = min(filled, self.window - 1)
        if slots == self.window:
            order = target = list(range(slots))
            new_head = head
        else:
            order = [(head - tau) % slots for tau in range(keep, 0, -1)] + [head]  # oldest .. current
            new_head = keep % self.window
            target = [(new_head - tau) % self.window for tau in range(keep, 0, -1)] + [new_head]
        device = self._home_device()
        src = torch.tensor(order, dtype=torch.long)
        dst = torch.tensor(target, dtype=torch.long)
        for name, value in loaded.items():
            if name == _HISTORY_INDEX:
                continue
            value = value.detach().to(device=device)
            fresh = value.new_zeros((self.window, ) + tuple(value.shape[1:]))
            fresh[dst.to(value.device)] = value[src.to(value.device)]
            self._history[name] = fresh
        self._history[_HISTORY_INDEX] = torch.zeros(3, dtype=torch.long, device=device)
        self._head, self._filled, self._pending_open = new_head, keep, bool(pending)
        self._pending_clock = None  # checkpoints are taken between iterations: close it on next use
        if self.history_patch_mean is not None:
            c_in, kh, kw = self.history_patch_mean.shape[1:]
            groups = c_in // self.history_var_grad.shape[2]
            self._geometry = (self.num_features, c_in, kh, kw, groups)
        self._write_index()


def _history_property(name: str) -> property:
    return property(lambda self: self._history.get(name),
                    doc=f'CBN history tensor ``{name}`` (None until the first recorded iteration).')


for _name in _HISTORY_BUFFERS:
    setattr(CrossIterationBatchNorm2d, _name, _history_property(_name))


def _check_window(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f'CBN {name} must be a positive int (1 = plain BN, paper: 4 on COCO, '
                         f'min(ceil(16 / images per GPU), 8) in general), got {value!r}')
