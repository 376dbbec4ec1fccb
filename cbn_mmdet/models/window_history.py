"""The past iterations of one CBN layer: a ring of ``window - 1`` entries, their compensation to the
current weights (Eqs. 7, 8, 10) and their state-dict form.

One entry per iteration holds μ and var of the batch (pooled over the iteration's calls), the
number of values, ∂μ/∂θ as a mean input patch, ∂var/∂θ, and the two linear terms of Eqs. 7-8 at the
weights it was recorded with (which replace storing old weights). The first call of an iteration
compensates the past entries, keeps the result for the iteration's later calls, then overwrites the
oldest slot with its own entry, open until the optimizer steps.
"""
import re
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from ..ops.statistics import (all_finite, compensate_history, linear_term_mean, linear_term_var,
                              merge_gradients, merge_moments)
from ..ops.window_norm import statistics_dtype
from .conv_binding import ConvWeights

__all__ = ['WindowHistory', 'CallHistories', 'PastWindow', 'HistoryEntry', 'HISTORY_STATS',
           'HISTORY_GRADS', 'HISTORY_TENSORS', 'HISTORY_INDEX', 'HISTORY_KEYS', 'PROCESSES_KEY',
           'RANK_KEY', 'rank_key']

HISTORY_STATS = ('history_mean', 'history_var', 'history_count', 'history_mean_ref',
                 'history_var_ref', 'history_compensable')
HISTORY_GRADS = ('history_patch_mean', 'history_var_grad')
HISTORY_TENSORS = HISTORY_STATS + HISTORY_GRADS
#: long [newest slot, entries held, newest entry open, conv bias trainable (-1: unknown)]: the
#: cursor lives on the host and is written only into state dicts
HISTORY_INDEX = 'history_index'
HISTORY_KEYS = HISTORY_TENSORS + (HISTORY_INDEX, )
#: SyncCBN's state-dict keys: long ``[processes, rank, gathered]`` of the run that saved the history
#: (``gathered``: every process's history is saved, call i's key ``k`` of rank r as ``rank<r>_k``)
PROCESSES_KEY = 'history_processes'
RANK_KEY = re.compile(r'rank(\d+)_(.+)')
#: the layer's state-dict version of this layout. 3: a ring of ``window`` slots; 4: ``window - 1``
#: slots, the newest entry possibly the open current iteration; 5: ``history_index`` also says
#: whether the conv's bias was trainable
HISTORY_VERSION = 5

Geometry = Tuple  # ConvWeights.geometry; its last item may be None when loaded from version 4


class PastWindow(NamedTuple):
    """The past iterations of the current iteration's window, over the ring's slots."""
    mean: Tensor            # (slots, C) μ̃, moved to the current weights (Eq. 7) when compensated
    var: Tensor             # (slots, C) var̃ = max(ν̃ − μ̃², 0) (Eqs. 8, 10)
    valid: Tensor           # (slots,) 1 for the slots in the window
    counts: Tensor          # (slots,) number of values of each valid entry (0 elsewhere)
    count: Tensor           # () their sum
    recorded_mean: Tensor   # (slots, C) as recorded
    recorded_var: Tensor
    compensated: bool

    def correction_size(self, eps: float) -> Dict[str, Tensor]:
        """How far Eqs. 7-8 moved the window's entries, relative to their scale (no host sync):
        ``{'mean': mean |Δμ|/σ, 'var': mean |Δvar|/var}`` over the valid entries and channels."""
        weights = self.valid.unsqueeze(1) / (self.valid.sum() * self.mean.shape[1]).clamp_min(1.0)
        rel_mean = ((self.mean - self.recorded_mean).abs() / (self.recorded_var + eps).sqrt()
                    * weights).sum()
        rel_var = ((self.var - self.recorded_var).abs() / (self.recorded_var + eps) * weights).sum()
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

    def reset(self) -> None:
        """Forget every entry."""
        # the per-slot statistics are views into one (slots, 4C + 2) tensor, so that an entry is
        # written in one operation; the gradients are tensors of their own
        self.tensors: Dict[str, Tensor] = {}
        self._packed: Optional[Tensor] = None
        self.head = self.slots - 1        # slot of the newest entry (the next one goes to slot 0)
        self.filled = 0                   # entries held, the open one included
        self.open = False                 # the newest entry is the current iteration's
        self.opened_at: Optional[int] = None  # iteration clock when that entry was opened
        self.geometry: Optional[Geometry] = None  # of the conv whose gradients are recorded
        # ((iteration, active window), weight state, PastWindow) of the current iteration
        self._cache: Optional[tuple] = None
        self._in_window: Dict[tuple, Tensor] = {}  # the window's slots by cursor position
        self._count_cache: Optional[tuple] = None
        self._zeros_cache: Dict[tuple, Tensor] = {}

    def _set_packed(self, packed: Tensor) -> None:
        """Make ``packed`` the per-slot statistics (columns: mean, var, mean_ref, var_ref by channel,
        then count and compensable)."""
        c = self.num_features
        self._packed = packed
        for i, name in enumerate(('history_mean', 'history_var', 'history_mean_ref',
                                  'history_var_ref')):
            self.tensors[name] = packed[:, i * c:(i + 1) * c]
        self.tensors['history_count'] = packed[:, 4 * c]
        self.tensors['history_compensable'] = packed[:, 4 * c + 1]

    # ------------------------------------------------------------------ queries
    def get(self, name: str) -> Optional[Tensor]:
        return self.tensors.get(name)

    def slots_newest_first(self) -> List[int]:
        return [(self.head - age) % self.slots for age in range(self.filled)]

    def entries(self) -> List[HistoryEntry]:
        """The entries held, newest first (the first is the current iteration's while ``open``)."""
        t = self.tensors
        return [HistoryEntry(*(t[name][slot] for name in HISTORY_STATS),
                             *(t[name][slot] if name in t else None for name in HISTORY_GRADS))
                for slot in self.slots_newest_first()]

    def nbytes(self) -> int:
        """Memory held by the ring's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def index(self) -> Optional[Tensor]:
        """The cursor as a state-dict tensor (None while empty)."""
        if not self.tensors:
            return None
        bias = -1 if self.geometry is None or self.geometry[5] is None else int(self.geometry[5])
        return torch.tensor([self.head, self.filled, int(self.open), bias], dtype=torch.long,
                            device=self.tensors['history_mean'].device)

    def last_window(self) -> Optional[PastWindow]:
        """The past window computed for the current (or last) iteration, if it had entries."""
        if self._cache is None or self._cache[2].valid.numel() == 0:
            return None
        return self._cache[2]

    # ------------------------------------------------------------------ per iteration
    def advance(self, clock: int) -> None:
        """Close the open entry when the optimizer has stepped since it was opened."""
        if self.open and clock != self.opened_at:
            self.open = False
        self.opened_at = clock

    def past(self, weights: Optional[ConvWeights], like: Tensor, active_window: int,
             clamp: bool = True) -> PastWindow:
        """Compensated past of the active window; computed at the first call of an iteration and
        reused by its later calls (and by the recomputation of a checkpointed forward, which must
        normalise exactly as the first pass did). ``clamp=False``: ``var`` without Eq. 10 (for
        SyncCBN, which clamps after pooling the processes' moments)."""
        weight_state = None if weights is None else (weights.weight.data_ptr(),
                                                     weights.weight._version)
        key = (self.opened_at, active_window, clamp)
        if self._cache is not None and self._cache[0] == key:
            cached_state = self._cache[1]
            if weight_state is None or cached_state is None or cached_state == weight_state:
                return self._cache[2]
            self._warn('midstep', 'its conv weights changed between two calls of one iteration: '
                       'either they were changed in place without an optimizer step (the window '
                       'loses its oldest entry for this iteration), or the optimizer step was not '
                       'seen (the iteration clock advances on torch optimizers\' global step hooks; a '
                       'loop that bypasses them, e.g. torch.compile on torch 2.1, must call '
                       'cbn_mmdet.models.iteration_clock.next_iteration() after each step)')
        if not self.tensors or self.filled - self.open == 0:
            empty = like.new_zeros((0, self.num_features), dtype=statistics_dtype(like))
            none = empty.new_zeros(0)
            result = PastWindow(empty, empty, none, none, empty.new_zeros(()), empty, empty, False)
        else:
            t = self.tensors
            valid = self._valid(active_window)
            c = self.num_features
            recorded_stats = self._packed[:, :2 * c].clone()  # the ring may be overwritten next
            recorded = recorded_stats[:, :c], recorded_stats[:, c:]
            mean, var = recorded
            compensated = (weights is not None and 'history_patch_mean' in t
                           and self.geometry_matches(weights))
            if compensated:
                mean, var = compensate_history(
                    mean, var, t['history_mean_ref'], t['history_var_ref'], t['history_patch_mean'],
                    t['history_var_grad'], t['history_compensable'], weights.weight, weights.bias,
                    weights.groups, clamp)
            counts = t['history_count'] * valid
            result = PastWindow(mean, var, valid, counts, counts.sum(), *recorded, compensated)
        self._cache = (key, weight_state, result)
        return result

    def _valid(self, active_window: int) -> Tensor:
        """1 for the slots in the window, on the device, from host integers only."""
        count = self.tensors['history_count']
        # (the ring's device and dtype change only through apply/load, which empty this cache)
        key = (self.head, self.filled, self.open, active_window)
        in_window = self._in_window.get(key)
        if in_window is None:
            first = int(self.open)                          # the open entry is this iteration's
            last = min(self.filled, first + active_window - 1)
            ages = [(self.head - slot) % self.slots for slot in range(self.slots)]  # 0: newest
            # built once per cursor position (a few per window), then no host-to-device copy
            in_window = torch.tensor([float(first <= age < last) for age in ages], dtype=count.dtype,
                                     device=count.device)
            self._in_window[key] = in_window
        return in_window * (count > 0)

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

        ``gradients()`` gives ``(∂μ/∂θ patch, ∂var/∂θ)`` of the batch; called only with ``weights``.
        """
        self._allocate(like, weights)
        if self.open:
            self._pool_into_open(batch_mean, batch_var, count, finite, weights, gradients)
            return
        t = self.tensors
        slot = (self.head + 1) % self.slots
        dtype = t['history_mean'].dtype
        zero = self._zeros(1, dtype, like.device)[0]
        if weights is None:
            refs, compensable = self._zeros(2 * self.num_features + 1, dtype, like.device).split(
                [2 * self.num_features, 1])
        else:
            patch, var_grad = gradients()
            # an entry whose gradients overflowed is kept, uncompensated (never inf/NaN in history)
            usable = finite & all_finite(var_grad, patch)
            slot_grad, slot_patch = t['history_var_grad'][slot], t['history_patch_mean'][slot]
            # written straight into the slot: one weight-sized pass, non-finite values never enter
            if slot_grad.dtype == var_grad.dtype == dtype:
                torch.where(usable, var_grad, zero, out=slot_grad)
            else:
                slot_grad.copy_(torch.where(usable, var_grad, zero.to(var_grad.dtype)))
            torch.where(usable, patch.to(dtype), zero, out=slot_patch)
            refs = _reference_terms(slot_patch, slot_grad, weights, dtype)
            compensable = usable.to(dtype).reshape(1)
        # the entry's statistics in one write: mean, var, mean_ref, var_ref, count, compensable;
        # nothing of a batch with non-finite moments (its count 0 keeps it out of every window)
        row = torch.cat([batch_mean.to(dtype), batch_var.to(dtype), refs,
                         self._count(count, dtype, like.device), compensable])
        torch.where(finite, row, zero, out=self._packed[slot])
        self.head = slot
        self.filled = min(self.filled + 1, self.slots)
        self.open = True

    def _pool_into_open(self, batch_mean: Tensor, batch_var: Tensor, count: float, finite: Tensor,
                        weights: Optional[ConvWeights],
                        gradients: Callable[[], Tuple[Tensor, Tensor]]) -> None:
        """Pool a later call of the current iteration into its open entry (merged moments and
        gradients, Chan et al.)."""
        t = self.tensors
        slot = self.head
        dtype = t['history_mean'].dtype
        new_count = finite.to(dtype) * count
        new_mean = torch.where(finite, batch_mean, 0.0).to(dtype)
        new_var = torch.where(finite, batch_var, 0.0).to(dtype)
        old_count = t['history_count'][slot]
        share_old = torch.where(old_count + new_count > 0,
                                old_count / (old_count + new_count).clamp_min(1e-12), 1.0)
        old_mean = t['history_mean'][slot].clone()
        pooled_count, pooled_mean, pooled_var = merge_moments(
            old_count, old_mean, t['history_var'][slot], new_count, new_mean, new_var)
        if weights is None:
            refs = new_mean.new_zeros(2 * self.num_features)
            compensable = new_count.new_zeros(())
        else:
            patch, var_grad = gradients()
            finite = finite & all_finite(var_grad, patch)
            zero = patch.new_zeros((), dtype=dtype)
            slot_grad = t['history_var_grad'][slot]
            patch, var_grad = merge_gradients(
                share_old, old_mean, t['history_patch_mean'][slot], slot_grad,
                new_mean, torch.where(finite, patch.to(dtype), zero),
                torch.where(finite, var_grad.to(dtype), zero), pooled_mean, weights.groups)
            slot_grad.copy_(var_grad)
            compensable = t['history_compensable'][slot] * finite.to(dtype)
            t['history_patch_mean'][slot] = patch
            refs = _reference_terms(patch, slot_grad, weights, dtype)
        self._packed[slot] = torch.cat([pooled_mean, pooled_var, refs, pooled_count.reshape(1),
                                        compensable.reshape(1)])

    def _count(self, count: float, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``[count]`` as a tensor, kept while the batch size stays (no host-to-device copy then)."""
        key = (count, dtype, device)
        if self._count_cache is None or self._count_cache[0] != key:
            self._count_cache = (key, torch.full((1, ), count, dtype=dtype, device=device))
        return self._count_cache[1]

    def _zeros(self, n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """``n`` zeros, kept (never written to)."""
        key = (n, dtype, device)
        zeros = self._zeros_cache.get(key)
        if zeros is None:
            zeros = self._zeros_cache[key] = torch.zeros(n, dtype=dtype, device=device)
        return zeros

    def drop_values(self) -> None:
        """Keep the cursor but make every entry empty (no values, no gradients used)."""
        if self._packed is not None:
            self._packed.zero_()
        self._cache = None

    def _allocate(self, like: Tensor, weights: Optional[ConvWeights]) -> None:
        slots, c, dtype = self.slots, self.num_features, statistics_dtype(like)
        if not self.tensors:
            self._set_packed(torch.zeros((slots, 4 * c + 2), dtype=dtype, device=like.device))
        if weights is not None and not self.geometry_matches(weights):
            if self.geometry is not None:
                self._warn('geometry', 'its conv changed shape, or its bias became trainable or '
                           'frozen; past gradients are discarded')
                self.tensors['history_compensable'].zero_()
            c_out, c_in, kh, kw, groups, _ = weights.geometry
            self.tensors['history_patch_mean'] = torch.zeros((slots, c_in, kh, kw), dtype=dtype,
                                                             device=like.device)
            self.tensors['history_var_grad'] = torch.zeros(
                (slots, c_out, c_in // groups, kh, kw), dtype=self.grad_dtype or dtype,
                device=like.device)
            self.geometry = weights.geometry

    def resize(self, slots: int, device: torch.device) -> None:
        """Change the ring to ``slots`` entries in place, keeping the newest ones."""
        held, clock = self.state(), self.opened_at
        self.slots = slots
        self.reset()
        if held:
            self.load(held, HISTORY_VERSION, device)
            self.opened_at = clock  # same process: the open entry is still this iteration's

    # ------------------------------------------------------------------ state
    def state(self) -> Dict[str, Tensor]:
        """The tensors and the cursor, as saved in state dicts (empty while empty)."""
        if not self.tensors:
            return {}
        # contiguous: a saved view would carry the whole packed storage
        return dict({name: t.contiguous() for name, t in self.tensors.items()},
                    **{HISTORY_INDEX: self.index()})

    def apply(self, fn) -> None:
        """Move like the module's ``_apply(fn)``, never narrowing below the statistics' precision
        (the history of a ``.half()`` module stays float32, like the statistics BN's kernels use)."""
        def move(t: Tensor) -> Tensor:
            target = fn(t.new_empty(0))
            dtype = t.dtype if target.dtype in (torch.float16, torch.bfloat16) else target.dtype
            return t.to(device=target.device, dtype=dtype)

        for name in HISTORY_GRADS:
            if name in self.tensors:
                self.tensors[name] = move(self.tensors[name])
        if self._packed is not None:
            self._set_packed(move(self._packed))
        self._cache = None
        self._in_window = {}
        self._count_cache, self._zeros_cache = None, {}

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
        stats_dtype = loaded['history_mean'].dtype
        self._set_packed(torch.zeros((self.slots, 4 * channels + 2), dtype=stats_dtype,
                                     device=device))
        dst_index = torch.tensor(dst, dtype=torch.long, device=device)
        src_index = torch.tensor(src, dtype=torch.long, device=device)
        for name, value in loaded.items():
            if name == HISTORY_INDEX:
                continue
            value = value.detach().to(device=device)
            if name in HISTORY_STATS:
                self.tensors[name][dst_index] = value[src_index].to(stats_dtype)
                continue
            if name == 'history_var_grad':
                value = value.to(self.grad_dtype or stats_dtype)
            fresh = value.new_zeros((self.slots, ) + tuple(value.shape[1:]))
            fresh[dst_index] = value[src_index]
            self.tensors[name] = fresh
        self.filled = len(keep)
        self.head = head if same_layout else (len(keep) - 1) % self.slots
        self.open = bool(pending) and bool(keep)
        self.opened_at = None  # checkpoints are taken between iterations: closed at the next use
        if 'history_patch_mean' in self.tensors:
            c_in, kh, kw = self.tensors['history_patch_mean'].shape[1:]
            groups = c_in // self.tensors['history_var_grad'].shape[2]
            self.geometry = (self.num_features, c_in, kh, kw, groups,
                             None if conv_bias < 0 else bool(conv_bias))


def _reference_terms(patch: Tensor, var_grad: Tensor, weights: ConvWeights,
                     dtype: torch.dtype) -> Tensor:
    """``[<∂μ/∂θ, θ> + b, <∂var/∂θ, θ>]`` of one entry at the weights it is recorded with: the linear
    terms of Eqs. 7-8, kept instead of the weights."""
    return torch.cat([
        linear_term_mean(patch[None], weights.weight, weights.bias, weights.groups)[0],
        linear_term_var(var_grad[None], weights.weight)[0].to(dtype)])


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
        self._clock: Optional[int] = None  # iteration of the calls counted in _calls
        self._calls = 0
        self.current = 0  # index of the last call handed out

    def __iter__(self):
        return iter(self.histories)

    def __getitem__(self, call: int) -> WindowHistory:
        return self.histories[call]

    def next_call(self, clock: int) -> WindowHistory:
        """The history of the next recorded call in iteration ``clock``."""
        if len(self.histories) == 1:
            return self.histories[0]
        if clock != self._clock:
            self._clock, self._calls = clock, 0
        self.current = self._calls % self.per_call
        self._calls += 1
        return self.histories[self.current]

    def reset(self) -> None:
        for history in self.histories:
            history.reset()
        self._clock = None

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
        return name.split('_', 1)[1] in HISTORY_KEYS if re.fullmatch(r'call\d+_.+', name) \
            else name in HISTORY_KEYS or name == PROCESSES_KEY

    def keys(self) -> List[str]:
        """Every state-dict key (suffix) the histories may use."""
        return [self.key(call, name) for call in range(len(self.histories)) for name in HISTORY_KEYS]

    def state(self) -> Dict[str, Tensor]:
        return {self.key(call, name): t for call, history in enumerate(self.histories)
                for name, t in history.state().items()}

    def load(self, state: Dict[str, Tensor], version: int, device: torch.device) -> None:
        """Restore from state-dict entries (keys without the module prefix); calls absent stay empty."""
        for call, history in enumerate(self.histories):
            loaded = {name: state[self.key(call, name)] for name in HISTORY_KEYS
                      if self.key(call, name) in state}
            if loaded:
                history.load(loaded, version, device)
