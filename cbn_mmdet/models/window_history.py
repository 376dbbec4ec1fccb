"""The past iterations of one CBN layer: a ring of ``window - 1`` entries, their compensation to the
current weights (Eqs. 7, 8, 10) and their state-dict form.

One entry per iteration holds μ and var of the batch (pooled over the iteration's calls), the
number of values, ∂μ/∂θ as a mean input patch, ∂var/∂θ, and the two linear terms of Eqs. 7-8 at the
weights it was recorded with (which replace storing old weights). The first call of an iteration
compensates the past entries, keeps the result for the iteration's later calls, then overwrites the
oldest slot with its own entry, open until the optimizer steps.

The layout in memory is channel-major (the compensation of all entries is then one matrix product
per statistic); state dicts keep the slot-major layout of version 5. A forward traced by
``torch.compile`` reads and moves the ring's cursor as a tensor (docs/design.md, "torch.compile").
"""
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..ops import fused
from ..ops.statistics import (DeferredCentring, all_finite, compensate_window, finite_flag,
                              merge_gradients, merge_moments)
from ..ops.window_norm import statistics_dtype
from . import iteration_clock
from .conv_binding import ConvWeights, is_compiling

__all__ = ['WindowHistory', 'CallHistories', 'PastWindow', 'HistoryEntry', 'HISTORY_STATS',
           'HISTORY_GRADS', 'HISTORY_TENSORS', 'HISTORY_INDEX', 'HISTORY_KEYS', 'HISTORY_PAST',
           'PROCESSES_KEY', 'RANK_KEY', 'SLICES_KEY', 'rank_key']

HISTORY_STATS = ('history_mean', 'history_var', 'history_count', 'history_mean_ref',
                 'history_var_ref', 'history_compensable')
HISTORY_GRADS = ('history_patch_mean', 'history_var_grad')
HISTORY_TENSORS = HISTORY_STATS + HISTORY_GRADS
#: long [newest slot, entries held, newest entry open, conv bias trainable (-1: unknown)]: the
#: cursor lives on the host and is written only into state dicts
HISTORY_INDEX = 'history_index'
HISTORY_KEYS = HISTORY_TENSORS + (HISTORY_INDEX, )
#: Saved only between two calls of one iteration: the iteration's past window, which its first call
#: computed before writing its entry over the ring's oldest (slot-major; ``history_past_window``:
#: long [active window, clamped, compensated]), so that a copy continues the iteration exactly
HISTORY_PAST = ('history_past_mean', 'history_past_var', 'history_past_valid',
                'history_past_recorded', 'history_past_window')
#: SyncCBN's state-dict keys: long ``[processes, rank, gathered]`` of the run that saved the history
#: (``gathered``: every process's history is saved, call i's key ``k`` of rank r as ``rank<r>_k``)
PROCESSES_KEY = 'history_processes'
#: The per-slice histories of a layer whose input is a concatenation (slice_history.py): long
#: ``[[start, width], ...]`` of its compensated slices, whose histories are ``slice<i>_<key>``
SLICES_KEY = 'history_slices'
_SLICE_PREFIX = re.compile(r'slice\d+_(.+)')
RANK_KEY = re.compile(r'rank(\d+)_(.+)')
#: the layer's state-dict version of this layout. 3: a ring of ``window`` slots; 4: ``window - 1``
#: slots, the newest entry possibly the open current iteration; 5: ``history_index`` also says
#: whether the conv's bias was trainable
HISTORY_VERSION = 5

Geometry = Tuple  # ConvWeights.geometry; its last item may be None when loaded from version 4


class PastWindow:
    """The past iterations of the current iteration's window, over the ring's slots.

    The fast path uses the channel-major ``mean_ct``/``var_ct`` ``(C, slots)``; the slot-major views
    and the recorded values are for analysis (:meth:`CrossIterationBatchNorm2d.past_window`).
    """
    __slots__ = ('mean_ct', 'var_ct', 'valid', 'compensated', '_recorded', '_channels')

    def __init__(self, mean_ct: Tensor, var_ct: Tensor, valid: Tensor, recorded: Tensor,
                 compensated: bool):
        self.mean_ct, self.var_ct = mean_ct, var_ct  # μ̃, var̃ = max(ν̃ − μ̃², 0) (Eqs. 7, 8, 10)
        self.valid = valid                # (slots,) 1 for the slots in the window
        self.compensated = compensated
        self._recorded = recorded          # (2C + 1, slots): mean, var, count as recorded
        self._channels = mean_ct.shape[0]

    @property
    def recorded(self) -> Tensor:
        return self._recorded

    def moved(self, move: Callable[[Tensor], Tensor]) -> 'PastWindow':
        return PastWindow(move(self.mean_ct), move(self.var_ct), move(self.valid),
                          move(self._recorded), self.compensated)

    @property
    def mean(self) -> Tensor:
        return self.mean_ct.t()

    @property
    def var(self) -> Tensor:
        return self.var_ct.t()

    @property
    def recorded_mean(self) -> Tensor:
        return self._recorded[:self._channels].t()

    @property
    def recorded_var(self) -> Tensor:
        return self._recorded[self._channels:2 * self._channels].t()

    @property
    def counts(self) -> Tensor:
        """(slots,) number of values of each valid entry (0 elsewhere)."""
        return self._recorded[2 * self._channels] * self.valid

    @property
    def count(self) -> Tensor:
        return torch.dot(self._recorded[2 * self._channels], self.valid)

    def correction_size(self, eps: float) -> Dict[str, Tensor]:
        """How far Eqs. 7-8 moved the window's entries, relative to their scale (no host sync):
        ``{'mean': mean |Δμ|/σ, 'var': mean |Δvar|/var}`` over the valid entries and channels."""
        mean, var, recorded_var = self.mean, self.var, self.recorded_var
        weights = self.valid.unsqueeze(1) / (self.valid.sum() * mean.shape[1]).clamp_min(1.0)
        rel_mean = ((mean - self.recorded_mean).abs() / (recorded_var + eps).sqrt()
                    * weights).sum()
        rel_var = ((var - recorded_var).abs() / (recorded_var + eps) * weights).sum()
        return {'mean': rel_mean, 'var': rel_var}


class HistoryEntry(NamedTuple):
    """One past iteration as recorded (views into the ring; the gradients are None until a conv
    was bound)."""
    mean: Tensor            # (C,) μ of the iteration's batches
    var: Tensor             # (C,) their biased variance
    count: Tensor           # () number of values (0: nothing finite was recorded)
    mean_ref: Tensor        # (C,) <∂μ/∂θ, θ> at the weights it was recorded with (Eq. 7)
    var_ref: Tensor         # (C,) <∂var/∂θ, θ> likewise (Eq. 8)
    compensable: Tensor     # () 1 if its gradients may be used
    patch_mean: Optional[Tensor]  # (C_in, kh, kw) ∂μ/∂θ as a mean input patch
    var_grad: Optional[Tensor]    # (C_out, C_in/G, kh, kw) ∂var/∂θ


class _Views:
    """Views of one ring's storage that the hot path uses every iteration (made once per
    allocation, device move or load, so that no view is made per forward).

    The statistics are channel-major, ``(4C + 3, slots)`` with one column per slot, so that an entry
    is written with one copy: mean, var (C rows each), count, present (1 while the entry holds
    values), compensable, then mean_ref, var_ref (C rows each).
    """

    def __init__(self, stats: Tensor, c: int):
        self.mean, self.var = stats[:c], stats[c:2 * c]                      # (C, T)
        self.var_rows = self.var.unsqueeze(1)                               # (C, 1, T)
        self.recorded = stats[:2 * c + 1]                                   # mean, var, count
        self.count, self.present, self.compensable = stats[2 * c:2 * c + 3]  # (T,)
        self.mean_ref, self.var_ref = stats[2 * c + 3:3 * c + 3], stats[3 * c + 3:]
        self.columns = stats.unbind(1)                                     # one per slot
        self.patches = self.grads = self.grad_slots = self.patch_slots = None

    def set_gradients(self, patches: Tensor, grads: Tensor, groups: int) -> None:
        """``patches`` ``(T, C_in, kh, kw)``, ``grads`` ``(C, T, C_in/G·K)``."""
        t = patches.shape[0]
        c_out, _, d = grads.shape
        if groups == 1:
            self.patches = patches.view(t, -1).t()                           # (C_in·K, T)
        else:
            self.patches = patches.view(t, groups, -1).permute(1, 2, 0)      # (G, D, T)
        self.grads = grads
        kernel = patches.shape[2:]
        self.grad_slots = [g.view(c_out, d // (kernel[0] * kernel[1]), *kernel)
                           for g in grads.unbind(1)]                         # weight-shaped
        self.patch_slots = patches.unbind(0)


class WindowHistory:
    """The ring of past iterations of one layer (see the module docstring).

    Args:
        num_features: channels ``C``.
        slots: ring size, ``window - 1`` (at least 1).
        grad_dtype: storage dtype of ∂var/∂θ, or None for the statistics' precision.
        warn: ``warn(key, message)`` for the layer's once-per-key warnings.
    """

    def __init__(self, num_features: int, slots: int, grad_dtype: Optional[torch.dtype],
                 warn: Callable[[str, str], None]):
        self.num_features, self.slots, self.grad_dtype, self._warn = (
            num_features, slots, grad_dtype, warn)
        self.reset()
        iteration_clock.watch(self)

    def __setstate__(self, state):  # a copy (deepcopy, pickle) listens to the clock too
        self.__dict__.update(state)
        iteration_clock.watch(self)
        # the copy's conv weights live elsewhere: views of the original's are not theirs, and the
        # iteration's past window holds for them as it is
        self._weight_views = None
        if self._cache is not None:
            self._cache = (self._cache[0], None, self._cache[2])

    def on_iteration(self) -> None:
        """The optimizer stepped: the next forward belongs to a new iteration."""
        self._stepped = True

    def reset(self) -> None:
        """Forget every entry."""
        self._stats: Optional[Tensor] = None   # (4C + 3, slots), see _Views
        self._patches: Optional[Tensor] = None  # (slots, C_in, kh, kw) ∂μ/∂θ
        self._grads: Optional[Tensor] = None    # (C, slots, C_in/G·kh·kw) ∂var/∂θ, channel-major
        self._views: Optional[_Views] = None
        self._head = self.slots - 1       # slot of the newest entry (the next one goes to slot 0)
        self._filled = 0                  # entries held, the open one included
        # the same two as a tensor: a traced forward reads and moves only this one (a graph that
        # read the integers would be compiled again at each ring position), and then the integers
        # are read back when host code next asks for them
        self._cursor: Optional[Tensor] = None
        self._host_stale = False
        self.open = False                 # the newest entry is the current iteration's
        self._stepped = True              # an optimizer step since the last forward
        self.geometry: Optional[Geometry] = None  # of the conv whose gradients are recorded
        # ((active window, clamp), weight state, PastWindow) of the current iteration
        self._cache: Optional[tuple] = None
        self._in_window: Dict[tuple, Tensor] = {}  # the window's slots by cursor position
        self._constants: Dict[tuple, Tensor] = {}  # small constant tensors, never written to
        self._weight_views: Optional[tuple] = None

    # ------------------------------------------------------------------ cursor
    @property
    def head(self) -> int:
        if self._host_stale:
            self._read_cursor()
        return self._head

    @head.setter
    def head(self, value: int) -> None:
        self._head = value

    @property
    def filled(self) -> int:
        if self._host_stale:
            self._read_cursor()
        return self._filled

    @filled.setter
    def filled(self, value: int) -> None:
        self._filled = value

    def _read_cursor(self) -> None:
        self._head, self._filled = (int(v) for v in self._cursor.tolist())
        self._host_stale = False

    def _write_cursor(self) -> None:
        """The tensor cursor from the integers (eager forwards; no host-to-device copy in steady
        state: the few cursor positions are cached)."""
        values = (self._head, self._filled)
        if self._cursor is None:
            self._cursor = torch.tensor(values, dtype=torch.long, device=self._stats.device)
            _static(self._cursor)
        else:
            self._cursor.copy_(self._constant(('cursor', ) + values, values, torch.long,
                                              self._stats.device))

    def _set_storage(self, stats: Tensor, patches: Optional[Tensor] = None,
                     grads: Optional[Tensor] = None) -> None:
        for t in (stats, patches, grads):
            _static(t)
        self._stats, self._patches, self._grads = stats, patches, grads
        if self._cursor is None or self._cursor.device != stats.device:
            self._cursor = None
            self._write_cursor()
        self._views = _Views(stats, self.num_features)
        if grads is not None:
            self._views.set_gradients(patches, grads, self.geometry[4])

    def _live_views(self) -> _Views:
        """The cached views, or under ``torch.compile`` views made from the storage in the traced
        graph (views kept between forwards would enter the graph as separate inputs aliasing the
        storage it writes, which AOT autograd refuses)."""
        if not is_compiling():
            return self._views
        views = _Views(self._stats, self.num_features)
        if self._grads is not None:
            views.set_gradients(self._patches, self._grads, self.geometry[4])
        return views

    # ------------------------------------------------------------------ queries
    @property
    def tensors(self) -> Dict[str, Tensor]:
        """The history in its state-dict layout (slot-major; views where the layout allows)."""
        if self._stats is None:
            return {}
        v, c = self._views, self.num_features
        out = {'history_mean': v.mean.t(), 'history_var': v.var.t(), 'history_count': v.count,
               'history_mean_ref': v.mean_ref.t(), 'history_var_ref': v.var_ref.t(),
               'history_compensable': v.compensable}
        if self._grads is not None:
            out['history_patch_mean'] = self._patches
            out['history_var_grad'] = self._grads.transpose(0, 1).reshape(
                (self.slots, c) + tuple(v.grad_slots[0].shape[1:]))
        return out

    def get(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(name)

    def slots_newest_first(self) -> List[int]:
        return [(self.head - age) % self.slots for age in range(self.filled)]

    def entries(self) -> List[HistoryEntry]:
        """The entries held, newest first (the first is the current iteration's while ``open``)."""
        if self._stats is None:
            return []
        v = self._views
        grads = v.grad_slots is not None
        return [HistoryEntry(v.mean[:, s], v.var[:, s], v.count[s], v.mean_ref[:, s],
                             v.var_ref[:, s], v.compensable[s],
                             v.patch_slots[s] if grads else None, v.grad_slots[s] if grads else None)
                for s in self.slots_newest_first()]

    def nbytes(self) -> int:
        """Memory held by the ring's tensors."""
        return sum(t.numel() * t.element_size() for t in (self._stats, self._patches, self._grads)
                   if t is not None)

    def index(self) -> Optional[Tensor]:
        """The cursor as a state-dict tensor (None while empty)."""
        if self._stats is None:
            return None
        bias = -1 if self.geometry is None or self.geometry[5] is None else int(self.geometry[5])
        return torch.tensor([self.head, self.filled, int(self.open), bias], dtype=torch.long,
                            device=self._stats.device)

    def last_window(self) -> Optional[PastWindow]:
        """The past window computed for the current (or last) iteration, if it had entries."""
        if self._cache is None or self._cache[2].valid.numel() == 0:
            return None
        return self._cache[2]

    # ------------------------------------------------------------------ per iteration
    def advance(self) -> None:
        """At the first forward after an optimizer step: close the open entry, forget the past
        window of the previous iteration."""
        if self._stepped:
            self._stepped = False
            self.open = False
            self._cache = None

    def past(self, weights: Optional[ConvWeights], like: Tensor, active_window: int,
             clamp: bool = True) -> PastWindow:
        """Compensated past of the active window; computed at the first call of an iteration and
        reused by its later calls (and by the recomputation of a checkpointed forward, which must
        normalise exactly as the first pass did). ``clamp=False``: ``var`` without Eq. 10 (for
        SyncCBN, which clamps after pooling the processes' moments)."""
        compiling = is_compiling()
        weight_state = None if weights is None or compiling else (weights.weight.data_ptr(),
                                                                  weights.weight._version)
        key = (active_window, clamp)
        if self._cache is not None and self._cache[0] == key:
            cached_state = self._cache[1]
            if torch.is_tensor(cached_state):  # (as the one-call step gives it)
                cached_state = tuple(cached_state.tolist())
            if weight_state is None or cached_state is None or cached_state == weight_state:
                return self._cache[2]
            self._warn('midstep', 'its conv weights changed between two calls of one iteration: '
                       'either they were changed in place without an optimizer step (the window '
                       'loses its oldest entry for this iteration), or the optimizer step was not '
                       'seen (the iteration clock advances on torch optimizers\' global step hooks; a '
                       'loop that bypasses them, e.g. torch.compile on torch 2.1, must call '
                       'cbn_mmdet.models.iteration_clock.next_iteration() after each step)')
        if self._stats is None or not compiling and self.filled - self.open == 0:
            empty = like.new_zeros((self.num_features, 0), dtype=statistics_dtype(like))
            none = empty.new_zeros(0)
            result = PastWindow(empty, empty, none, empty.new_zeros((2 * self.num_features + 1, 0)),
                                False)
        elif self._fused_ops() is not None:
            result = self._past_fused(weights, active_window, clamp)
        else:
            v = self._live_views()
            valid = self._valid_traced(active_window) if compiling else self._valid(active_window)
            recorded = v.recorded.clone()  # the ring's oldest slot may be overwritten next
            compensated = (weights is not None and self._grads is not None
                           and self.geometry_matches(weights))
            if compensated:
                rows, vectors = self._weight_views_of(weights)
                grads = v.grads if v.grads.dtype == rows.dtype else v.grads.to(rows.dtype)
                bias = weights.bias
                if bias is not None and bias.dtype != rows.dtype:
                    bias = bias.to(rows.dtype)
                mean, var = compensate_window(
                    v.mean, v.var_rows, v.mean_ref, v.var_ref, v.patches, grads, rows, vectors, bias,
                    v.compensable, weights.groups, clamp)
            else:
                c = self.num_features
                mean, var = recorded[:c], recorded[c:2 * c]
            result = PastWindow(mean, var, valid, recorded, compensated)
        self._cache = (key, weight_state, result)
        return result

    def recorded_in_one_call(self, active_window: int, weight_state: Optional[Tensor],
                             compensated: bool, valid: Tensor, recorded: Tensor, mean: Tensor,
                             var: Tensor) -> None:
        """The layer's one-call training step (``csrc/train_step.cpp``) did :meth:`advance`,
        :meth:`past` and :meth:`record` of the first forward of an iteration: the same state
        after it (the cursor moved in its tensor; the integers are read back when asked)."""
        self._stepped = False
        self.open = True
        self._host_stale = True
        self._cache = ((active_window, True), weight_state,
                       PastWindow(mean, var, valid, recorded, compensated))

    def _fused_ops(self):
        """The fused CPU ops where they apply to this ring (eager, CPU), else None."""
        return fused.applies(self._stats)

    def _past_fused(self, weights: Optional[ConvWeights], active_window: int,
                    clamp: bool) -> PastWindow:
        """:meth:`past` with the fused op (the products with θ and the rest in one pass)."""
        compensated = (weights is not None and self._grads is not None
                       and self.geometry_matches(weights))
        valid, recorded, mean, var = fused.ops().past_window(
            self._stats, self._in_window_mask(active_window),
            *((weights.weight, self._patches, self._grads, weights.bias, weights.groups)
              if compensated else (None, None, None, None, 1)), clamp)
        return PastWindow(mean, var, valid, recorded, compensated)

    def _weight_views_of(self, weights: ConvWeights) -> Tuple[Tensor, Tensor]:
        """θ as the rows and the row vectors :func:`compensate_window` takes (kept while the
        weight's storage is the same: the optimizer updates it in place)."""
        w = weights.weight
        dtype = self._stats.dtype
        compiling = is_compiling()  # (a traced forward makes views for free)
        key = None if compiling else (w.data_ptr(), w.shape, w.dtype, w.device, weights.groups)
        if self._weight_views is not None and self._weight_views[0] == key:
            return self._weight_views[1]
        keep = w.dtype == dtype and w.is_contiguous() and not compiling
        w = w.to(dtype).contiguous()
        c_out, groups = w.shape[0], weights.groups
        rows = w.view(c_out, -1) if groups == 1 else w.view(groups, c_out // groups, -1)
        views = (rows, w.view(c_out, 1, -1))
        if keep:  # views of the parameter itself; a converted copy is made again each time
            self._weight_views = (key, views)
        return views

    def _valid(self, active_window: int) -> Tensor:
        """1 for the slots in the window that hold values, on the device, from host integers."""
        return self._in_window_mask(active_window) * self._views.present

    def _in_window_mask(self, active_window: int) -> Tensor:
        """1 for the slots in the window (held or not), from host integers."""
        # (the ring's device and dtype change only through apply/load, which empty this cache)
        key = (self.head, self.filled, self.open, active_window)
        in_window = None if is_compiling() else self._in_window.get(key)
        if in_window is None:
            first = int(self.open)                          # the open entry is this iteration's
            last = min(self.filled, first + active_window - 1)
            ages = [(self.head - slot) % self.slots for slot in range(self.slots)]  # 0: newest
            # built once per cursor position (a few per window), then no host-to-device copy
            in_window = torch.tensor([float(first <= age < last) for age in ages],
                                     dtype=self._stats.dtype, device=self._stats.device)
            if not is_compiling():
                self._in_window[key] = in_window
        return in_window

    def _valid_traced(self, active_window: int) -> Tensor:
        """:meth:`_valid` from the tensor cursor (the same for every ring position)."""
        head, filled = self._cursor.unbind()
        ages = (head - torch.arange(self.slots, device=head.device)) % self.slots
        first = int(self.open)
        in_window = (ages >= first) & (ages < filled.clamp_max(first + active_window - 1))
        return in_window.to(self._stats.dtype) * self._live_views().present

    def geometry_matches(self, weights: ConvWeights) -> bool:
        """Whether the recorded gradients belong to a conv shaped like ``weights`` (a geometry
        loaded from a version-4 checkpoint does not know the bias: it adopts the binding's)."""
        if self.geometry is None:
            return False
        if self.geometry[5] is None and self.geometry[:5] == weights.geometry[:5]:
            self.geometry = weights.geometry
        return self.geometry == weights.geometry

    def record(self, like: Tensor, batch_mean: Tensor, batch_var: Tensor, count: float,
               finite: Tensor, weights: Optional[ConvWeights],
               gradients: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        """Write the current iteration's entry over the oldest, or pool into it when open.

        ``gradients()`` gives ``(∂μ/∂θ patch, ∂var/∂θ)`` of the batch; called only with ``weights``
        (``gradients(True)``: ∂var/∂θ may be a :class:`DeferredCentring`).
        """
        self._allocate(like, weights)
        traced = is_compiling()
        if self.open:
            if traced:
                raise RuntimeError(
                    f'CBN({self.num_features}) under torch.compile takes one training forward per '
                    'iteration (per call with per_call); a second forward before the optimizer step '
                    '(gradient accumulation, a shared head without per_call) pools into the '
                    "iteration's entry, which only eager mode does: compile without CBN layers "
                    'called that way, or set per_call to the number of calls')
            self._pool_into_open(batch_mean, batch_var, count, finite, weights, gradients)
            return
        if not traced and self._fused_ops() is not None and (
                weights is None or weights.weight.dtype == self._stats.dtype):
            self._record_fused(batch_mean, batch_var, count, finite, weights, gradients)
            return
        v = self._live_views()
        dtype = self._stats.dtype
        zero = self._constant(('zero', ), 0.0, dtype, like.device)
        c = self.num_features
        mean = batch_mean if batch_mean.dtype == dtype else batch_mean.to(dtype)
        var = batch_var if batch_var.dtype == dtype else batch_var.to(dtype)
        grads = None
        if weights is None:
            # count, present, compensable, then zero references
            tail = self._constant(('plain', count, c), (count, 1.0, 0.0) + (0.0, ) * (2 * c), dtype,
                                  like.device)
            column = (finite, torch.cat([mean, var, tail]), zero)
        else:
            patch, var_grad = gradients()
            patch = patch if patch.dtype == dtype else patch.to(dtype)
            if var_grad.dtype != v.grads.dtype:  # the reference from the values stored (rounded)
                var_grad = var_grad.to(v.grads.dtype)
            refs = self._reference_terms(patch, var_grad, weights)
            row = torch.cat([mean, var, self._constant(('entry', count), (count, 1.0, 1.0), dtype,
                                                       like.device), refs])
            # an entry whose gradients (or their products with θ) overflowed is kept, uncompensated;
            # nothing of a batch with non-finite moments (its count 0 keeps it out of every window)
            usable = finite_flag(row)
            plain = torch.cat([mean, var, self._constant(('plain', count, c), (count, 1.0, 0.0)
                                                         + (0.0, ) * (2 * c), dtype, like.device)])
            column = (usable, row, torch.where(finite, plain, zero))
            grads = ((usable, var_grad, zero.to(var_grad.dtype)), (usable, patch, zero))
        if traced:
            self._record_at_cursor(column, grads)
            return
        slot = (self.head + 1) % self.slots
        # written straight into the slot (one pass each); non-finite values never enter
        _write_where(v.columns[slot], *column)
        if grads is not None:
            _write_where(v.grad_slots[slot], *grads[0])
            _write_where(v.patch_slots[slot], *grads[1])
        elif v.grad_slots is not None:  # (the compensation uses no mask: zero gradients)
            v.grad_slots[slot].zero_()
            v.patch_slots[slot].zero_()
        self.head = slot
        self.filled = min(self.filled + 1, self.slots)
        self.open = True
        self._write_cursor()

    def _record_fused(self, batch_mean: Tensor, batch_var: Tensor, count: float, finite: Tensor,
                      weights: Optional[ConvWeights],
                      gradients: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        """:meth:`record` with the fused op (the reference terms and every write in one pass)."""
        patch = var_grad = weight = bias = centre_mean = centre_patch = None
        groups, scale = 1, 1.0
        if weights is not None:
            patch, var_grad = gradients(True)
            weight, bias, groups = weights.weight, weights.bias, weights.groups
            if isinstance(var_grad, DeferredCentring):  # formed by the op as it writes it
                var_grad, scale, centre_mean, centre_patch = var_grad
        slot = (self.head + 1) % self.slots
        filled = min(self.filled + 1, self.slots)
        fused.ops().record_entry(self._stats, slot, batch_mean, batch_var, count, finite, patch,
                                 var_grad, scale, centre_mean, centre_patch, self._patches,
                                 self._grads, weight, bias, groups, self._cursor, filled)
        self.head, self.filled, self.open = slot, filled, True

    def _record_at_cursor(self, column: tuple, grads: Optional[tuple]) -> None:
        """The writes of :meth:`record` at the slot after the tensor cursor (a traced forward)."""
        head, filled = self._cursor.unbind()
        slot = ((head + 1) % self.slots).view(1)
        self._stats.index_copy_(1, slot, torch.where(*column).unsqueeze(1))
        if grads is not None:
            c_out = self._grads.shape[0]
            self._grads.index_copy_(1, slot, torch.where(*grads[0]).reshape(c_out, 1, -1))
            self._patches.index_copy_(0, slot, torch.where(*grads[1]).unsqueeze(0))
        elif self._grads is not None:  # (the compensation uses no mask: zero gradients)
            self._grads.index_fill_(1, slot, 0.0)
            self._patches.index_fill_(0, slot, 0.0)
        self._cursor.copy_(torch.cat([slot, (filled + 1).clamp_max(self.slots).view(1)]))
        self.open = True
        self._host_stale = True

    def _reference_terms(self, patch: Tensor, var_grad: Tensor, weights: ConvWeights) -> Tensor:
        """``[<∂μ/∂θ, θ> + b, <∂var/∂θ, θ>]`` of one entry at the weights it is recorded with: the
        linear terms of Eqs. 7-8, kept instead of the weights."""
        rows, vectors = self._weight_views_of(weights)
        c = self.num_features
        if var_grad.dtype != rows.dtype:
            var_grad = var_grad.to(rows.dtype)
        if weights.groups == 1:
            flat = patch.reshape(-1)
            mean = torch.mv(rows, flat) if weights.bias is None else torch.addmv(
                weights.bias.to(rows.dtype), rows, flat)
        else:
            mean = torch.bmm(rows, patch.reshape(weights.groups, -1, 1)).view(c)
            if weights.bias is not None:
                mean = mean + weights.bias.to(rows.dtype)
        # (reshape: the product of a channels-last conv comes channels-last; one elementwise
        # product and sum is faster here than a batched matrix product per channel)
        var = (var_grad.reshape(c, 1, -1) * vectors).sum((1, 2))
        return torch.cat([mean, var])

    def _pool_into_open(self, batch_mean: Tensor, batch_var: Tensor, count: float, finite: Tensor,
                        weights: Optional[ConvWeights],
                        gradients: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        """Pool a later call of the current iteration into its open entry (merged moments and
        gradients, Chan et al.)."""
        v = self._views
        slot = self.head
        dtype = self._stats.dtype
        new_count = finite.to(dtype) * count
        new_mean = torch.where(finite, batch_mean, 0.0).to(dtype)
        new_var = torch.where(finite, batch_var, 0.0).to(dtype)
        old_count = v.count[slot]
        share_old = torch.where(old_count + new_count > 0,
                                old_count / (old_count + new_count).clamp_min(1e-12), 1.0)
        old_mean = v.mean[:, slot].clone()
        pooled_count, pooled_mean, pooled_var = merge_moments(
            old_count, old_mean, v.var[:, slot], new_count, new_mean, new_var)
        present = (pooled_count > 0).to(dtype).reshape(1)
        if weights is None:
            refs = new_mean.new_zeros(2 * self.num_features)
            compensable = new_count.new_zeros(1)
        else:
            patch, var_grad = gradients()
            finite = finite & all_finite(var_grad, patch)
            zero = patch.new_zeros((), dtype=dtype)
            patch, var_grad = merge_gradients(
                share_old, old_mean, v.patch_slots[slot], v.grad_slots[slot],
                new_mean, torch.where(finite, patch.to(dtype), zero),
                torch.where(finite, var_grad.to(dtype), zero), pooled_mean, weights.groups)
            compensable = (v.compensable[slot] * finite.to(dtype)).reshape(1)
            v.patch_slots[slot].copy_(patch)
            v.grad_slots[slot].copy_(var_grad)
            # a non-compensable entry holds zero references
            refs = self._reference_terms(v.patch_slots[slot], v.grad_slots[slot], weights)
            refs = refs * compensable
        if v.grad_slots is not None:  # and zero gradients (compensation uses no mask)
            v.patch_slots[slot].mul_(compensable)
            v.grad_slots[slot].mul_(compensable.to(v.grad_slots[slot].dtype))
        v.columns[slot].copy_(torch.cat([pooled_mean, pooled_var, pooled_count.reshape(1), present,
                                         compensable, refs]))

    def _constant(self, key: tuple, values: tuple, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
        """``values`` as a tensor, kept (never written to), e.g. an entry's count while the batch
        size stays: no host-to-device copy then."""
        if is_compiling():
            return torch.tensor(values, dtype=dtype, device=device)
        key = key + (dtype, device)
        t = self._constants.get(key)
        if t is None:
            t = self._constants[key] = torch.tensor(values, dtype=dtype, device=device)
        return t

    def drop_values(self) -> None:
        """Keep the cursor but make every entry empty (no values, no gradients used)."""
        if self._stats is not None:
            self._stats.zero_()
        self._cache = None

    def _allocate(self, like: Tensor, weights: Optional[ConvWeights]) -> None:
        slots, c, dtype = self.slots, self.num_features, statistics_dtype(like)
        if self._stats is None:
            self._set_storage(torch.zeros((4 * c + 3, slots), dtype=dtype, device=like.device))
        if weights is not None and not self.geometry_matches(weights):
            if self.geometry is not None:
                self._warn('geometry', 'its conv changed shape, or its bias became trainable or '
                           'frozen; past gradients are discarded')
                # as recorded from now on: no gradients, no references
                v = self._views
                v.compensable.zero_()
                v.mean_ref.zero_()
                v.var_ref.zero_()
            c_out, c_in, kh, kw, groups, _ = weights.geometry
            self.geometry = weights.geometry
            dtype = self._stats.dtype
            patches = torch.zeros((slots, c_in, kh, kw), dtype=dtype, device=like.device)
            grads = torch.zeros((c_out, slots, c_in // groups * kh * kw),
                                dtype=self.grad_dtype or dtype, device=like.device)
            self._set_storage(self._stats, patches, grads)

    def resize(self, slots: int, device: torch.device) -> None:
        """Change the ring to ``slots`` entries in place, keeping the newest ones."""
        held, stepped = self.state(), self._stepped
        self.slots = slots
        self.reset()
        if held:
            self.load(held, HISTORY_VERSION, device)
        self._stepped = stepped  # same process: the open entry is still this iteration's

    # ------------------------------------------------------------------ state
    def state(self) -> Dict[str, Tensor]:
        """The tensors and the cursor, as saved in state dicts (empty while empty)."""
        if self._stats is None:
            return {}
        # contiguous: a saved view would carry the whole storage
        state = dict({name: t.contiguous() for name, t in self.tensors.items()},
                     **{HISTORY_INDEX: self.index()})
        if self.open and not self._stepped and self._cache is not None:
            (window, clamp), _, past = self._cache
            state.update(zip(HISTORY_PAST, (
                past.mean_ct.t().contiguous(), past.var_ct.t().contiguous(), past.valid.clone(),
                past.recorded.t().contiguous(),
                torch.tensor([window, int(clamp), int(past.compensated)], device=past.valid.device))))
        return state

    def apply(self, fn) -> None:
        """Move like the module's ``_apply(fn)``, never narrowing below the statistics' precision
        (the history of a ``.half()`` module stays float32, like the statistics BN's kernels use)."""
        if self._stats is None:
            return

        def move(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            target = fn(t.new_empty(0))
            dtype = t.dtype if target.dtype in (torch.float16, torch.bfloat16) else target.dtype
            return t.to(device=target.device, dtype=dtype)

        head, filled = self.head, self.filled
        self._cursor = None
        self._set_storage(move(self._stats), move(self._patches), move(self._grads))
        self.head, self.filled = head, filled
        self._write_cursor()
        if self._cache is not None:  # moved too: later calls of the iteration use it as it is
            key, _, past = self._cache
            self._cache = (key, None, past.moved(move))
        self._in_window, self._constants, self._weight_views = {}, {}, None

    def load(self, loaded: Dict[str, Tensor], version: int, device: torch.device) -> None:
        """Restore a saved ring, re-packed by age into this ring's slots (newest kept).

        Version-3 checkpoints kept ``window`` slots, ``filled`` counting closed entries only;
        version 4 did not record whether the conv's bias was trainable.
        """
        needed = set(HISTORY_STATS) | {HISTORY_INDEX}
        if not needed <= set(loaded):
            raise ValueError(f'incomplete CBN history in checkpoint (missing '
                             f'{sorted(needed - set(loaded))})')
        index = [int(v) for v in loaded[HISTORY_INDEX].tolist()]
        head, filled, pending = index[:3]
        conv_bias = index[3] if len(index) > 3 else -1
        saved_slots, channels = loaded['history_mean'].shape
        if channels != self.num_features:
            raise ValueError(f'CBN history has {channels} channels, layer has {self.num_features}')
        if version < 4:
            newest_first = [(head - age) % saved_slots for age in range(1 - pending, filled + 1)]
        else:
            newest_first = [(head - age) % saved_slots for age in range(filled)]
        keep = newest_first[:self.slots][::-1]  # oldest .. newest
        same_layout = version >= 4 and saved_slots == self.slots
        if same_layout:  # slots as saved: a resumed run sums in the same order, bit-exact
            src = dst = list(range(saved_slots))
        else:
            src, dst = keep, list(range(len(keep)))
        self.reset()
        dtype = loaded['history_mean'].dtype
        c = channels
        src_index = torch.tensor(src, dtype=torch.long)

        def picked(name: str) -> Tensor:
            value = loaded[name].detach().to(device='cpu')
            fresh = value.new_zeros((self.slots, ) + tuple(value.shape[1:]))
            fresh[dst] = value[src_index]
            return fresh.to(device)

        stats = torch.zeros((4 * c + 3, self.slots), dtype=dtype, device=device)
        stats[:c] = picked('history_mean').to(dtype).t()
        stats[c:2 * c] = picked('history_var').to(dtype).t()
        stats[2 * c] = picked('history_count').to(dtype)
        stats[2 * c + 1] = (stats[2 * c] > 0).to(dtype)
        stats[2 * c + 2] = picked('history_compensable').to(dtype)
        stats[2 * c + 3:3 * c + 3] = picked('history_mean_ref').to(dtype).t()
        stats[3 * c + 3:] = picked('history_var_ref').to(dtype).t()
        patches = grads = None
        if 'history_patch_mean' in loaded and 'history_var_grad' in loaded:
            patches = picked('history_patch_mean').to(dtype)
            saved_grads = picked('history_var_grad')
            c_in, kh, kw = patches.shape[1:]
            groups = c_in // saved_grads.shape[2]
            self.geometry = (self.num_features, c_in, kh, kw, groups,
                             None if conv_bias < 0 else bool(conv_bias))
            grads = saved_grads.to(self.grad_dtype or dtype).reshape(
                self.slots, self.num_features, -1).transpose(0, 1).contiguous()
        self._set_storage(stats, patches, grads)
        self.filled = len(keep)
        self.head = head if same_layout else (len(keep) - 1) % self.slots
        self.open = bool(pending) and bool(keep)
        self._write_cursor()
        # checkpoints are taken between iterations: the open entry is closed at the next use,
        # unless the state was saved between two calls of one iteration
        self._stepped = True
        if self.open and same_layout and set(HISTORY_PAST) <= set(loaded):
            window, clamp, compensated = (int(v) for v in loaded['history_past_window'].tolist())
            mean, var, valid, recorded = (loaded[name].detach().to(device=device, dtype=dtype)
                                          for name in HISTORY_PAST[:4])
            past = PastWindow(mean.t().contiguous(), var.t().contiguous(), valid,
                              recorded.t().contiguous(), bool(compensated))
            self._cache = ((window, bool(clamp)), None, past)
            self._stepped = False


def _static(t: Optional[Tensor]) -> None:
    """Tell ``torch.compile`` that the ring's sizes are fixed (a window change re-traces; dynamic
    sizes would only add guards)."""
    if t is not None and hasattr(torch._dynamo, 'mark_static'):
        torch._dynamo.mark_static(t)


def _write_where(dst: Tensor, condition: Tensor, value: Tensor, other: Tensor) -> None:
    """``dst[...] = where(condition, value, other)`` in one pass."""
    torch.where(condition, value, other, out=dst)


def rank_key(rank: int, key: str) -> str:
    """The key of process ``rank``'s history tensor ``key`` in a SyncCBN checkpoint."""
    return f'rank{rank}_{key}'


class CallHistories:
    """The histories of one layer: one, or with ``per_call=N`` one per call of a forward.

    A layer applied N times per forward (a single-stage head, once per FPN level) normalises the i-th
    call of an iteration with the i-th calls of the past iterations; calls are told apart by their
    order in the iteration, modulo N (so gradient-accumulation micro-batches pool per call). The first
    call's state-dict keys are the plain ones, call i's are prefixed ``call<i>_``.
    """

    def __init__(self, per_call: int, make: Callable[[], WindowHistory]):
        self.per_call = per_call
        self.histories = [make() for _ in range(max(per_call, 1))]
        self._calls = 0  # calls counted in this iteration
        self.current = 0  # index of the last call handed out
        iteration_clock.watch(self)

    def __setstate__(self, state):  # a copy (deepcopy, pickle) listens to the clock too
        self.__dict__.update(state)
        iteration_clock.watch(self)

    def on_iteration(self) -> None:
        self._calls = 0

    def __iter__(self):
        return iter(self.histories)

    def __getitem__(self, call: int) -> WindowHistory:
        return self.histories[call]

    def next_call(self) -> WindowHistory:
        """The history of the next recorded call of this iteration."""
        if len(self.histories) == 1:
            return self.histories[0]
        self.current = self._calls % self.per_call
        self._calls += 1
        return self.histories[self.current]

    def reset(self) -> None:
        for history in self.histories:
            history.reset()
        self._calls = 0

    @staticmethod
    def key(call: int, name: str) -> str:
        return name if call == 0 else f'call{call}_{name}'

    @staticmethod
    def is_key(key: str) -> bool:
        """Whether a state-dict key (``<layer path>.<name>``) holds a history tensor of any call (or
        of any process, SyncCBN's gathered histories included)."""
        name = key.rsplit('.', 1)[-1]
        rank = RANK_KEY.fullmatch(name)
        if rank:
            name = rank.group(2)
        if re.fullmatch(r'call\d+_.+', name):
            name = name.split('_', 1)[1]
        piece = _SLICE_PREFIX.fullmatch(name)
        if piece:
            name = piece.group(1)
        return (name in HISTORY_KEYS or name in HISTORY_PAST or name == PROCESSES_KEY
                or name == SLICES_KEY)

    def keys(self) -> List[str]:
        """Every state-dict key (suffix) the histories may use."""
        return [self.key(call, name) for call in range(len(self.histories))
                for name in HISTORY_KEYS + HISTORY_PAST]

    def state(self) -> Dict[str, Tensor]:
        return {self.key(call, name): t for call, history in enumerate(self.histories)
                for name, t in history.state().items()}

    def load(self, state: Dict[str, Tensor], version: int, device: torch.device) -> None:
        """Restore from state-dict entries (keys without the module prefix); calls absent stay empty."""
        for call, history in enumerate(self.histories):
            loaded = {name: state[self.key(call, name)] for name in HISTORY_KEYS + HISTORY_PAST
                      if self.key(call, name) in state}
            if loaded:
                history.load(loaded, version, device)
