"""Per-slice compensation of a CBN layer whose input is a channel concatenation (DenseNet).

The layer's ring (:class:`WindowHistory`) records the concatenation's statistics as they are, without
gradients. Beside it, each compensated slice ``[a, b)`` (see :mod:`.concat_binding`) has a
sub-history: a :class:`WindowHistory` of ``b - a`` channels, written at the same forwards as the
ring, so that its slots hold the same iterations (its statistics are the ring's rows ``a:b``), with
the ``∂μ/∂θ`` patch means and ``∂var/∂θ`` of the conv that produced the slice. The past window is
the ring's, with the rows of each compensated slice replaced by its sub-history's compensated rows
(Eqs. 7, 8, 10 with that conv's ``θ``): per channel exactly the single-conv computation, since a
channel's statistics depend only on the conv that produced it. Channels of other slices are used as
recorded.

The sub-histories follow the ring: they are built from its current content (the past entries
without gradients, used as recorded until refilled) when the layer first sees the concatenation,
when the slices change (other producers or shapes: a one-time warning), and whenever the ring was
written or replaced without them (another binding, a load without them, a device move is followed).
State-dict keys: ``slice<i>_<history key>`` per sub-history and ``history_slices`` (long
``[[start, width], ...]``), with ``call<i>_`` in front for the other calls of ``per_call``.
"""
import re
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .concat_binding import SliceBinding
from .conv_binding import BindStatus, ConvWeights
from .window_history import (HISTORY_INDEX, HISTORY_KEYS, HISTORY_PAST, HISTORY_VERSION, SLICES_KEY,
                             CallHistories, PastWindow, WindowHistory)

__all__ = ['SliceHistory', 'SliceWindow', 'ConcatHistories']

_SLICE_KEY = re.compile(r'(?:call(\d+)_)?(?:slice(\d+)_(.+)|' + SLICES_KEY + ')')


def _identity(weights: ConvWeights) -> Optional[int]:
    """Which conv a slice comes from (its weight parameter), when it is one."""
    return None if weights.parameters is None else id(weights.parameters[0])


class SliceHistory:
    """The sub-histories of the compensated slices of one ring (one call's)."""

    def __init__(self, grad_dtype: Optional[torch.dtype], warn: Callable[[str, str], None]):
        self.grad_dtype, self._warn = grad_dtype, warn
        self.reset()

    def reset(self) -> None:
        self.subs: Dict[Tuple[int, int], WindowHistory] = {}  # (start, width) -> sub-history
        # per compensated slice (start, width, geometry or None, producer identity or None)
        self.layout: Optional[tuple] = None
        self._ring: Optional[Tensor] = None  # the ring storage the subs were last written with
        self._cache: Optional[tuple] = None  # (the ring's past window, the compensated one)

    # ------------------------------------------------------------------ alignment
    def _matches(self, binding: SliceBinding) -> bool:
        slices = binding.compensated
        if self.layout is None or len(self.layout) != len(slices):
            return False
        for (start, width, _, identity), s in zip(self.layout, slices):
            if (start, width) != (s.start, s.width):
                return False
            if identity is not None and identity != _identity(s.weights):
                return False
            sub = self.subs[(start, width)]
            if sub.geometry is not None and not sub.geometry_matches(s.weights):
                return False
        return True

    def _follow(self, main: WindowHistory, binding: SliceBinding) -> None:
        """Sub-histories for ``binding``'s compensated slices, holding the ring's entries as
        recorded (no gradients)."""
        state = main.state() if main._stats is not None else {}
        device = None if main._stats is None else main._stats.device
        self.subs, self._cache = {}, None
        for s in binding.compensated:
            sub = WindowHistory(s.width, main.slots, self.grad_dtype, self._warn)
            if state:
                sub.load(_rows(state, s.start, s.stop), HISTORY_VERSION, device)
                sub.open, sub._stepped = main.open, main._stepped
            self.subs[(s.start, s.width)] = sub
        self._ring = main._stats
        self._remember(binding)

    def _remember(self, binding: SliceBinding) -> None:
        self.layout = tuple((s.start, s.width, s.weights.geometry, _identity(s.weights))
                            for s in binding.compensated)

    def view(self, main: WindowHistory, binding: SliceBinding, recording: bool,
             gradients: Callable) -> 'SliceWindow':
        """The ring with per-slice compensation for this forward (see :class:`SliceWindow`)."""
        if recording and not self._matches(binding):
            if self.layout is not None:
                self._warn('slices', 'the slices of its concatenated input changed (other '
                           'producing convs, or other shapes); their past gradients are discarded')
            self._follow(main, binding)
        elif self._ring is not main._stats or self.layout is None:
            self._follow(main, binding)  # the ring was replaced or written without the slices
        elif recording:
            self._remember(binding)  # (a loaded layout adopts the producers)
        return SliceWindow(self, main, binding, gradients)

    def last_window(self, main: WindowHistory) -> Optional[PastWindow]:
        """The compensated past window of the ring's current iteration, if it was computed here."""
        base = main.last_window()
        if base is not None and self._cache is not None and self._cache[0] is base:
            return self._cache[1]
        return base

    # ------------------------------------------------------------------ module state
    def apply(self, fn, main: WindowHistory) -> None:
        """After the ring's ``apply(fn)``: move the sub-histories (and this iteration's window)."""
        for sub in self.subs.values():
            sub.apply(fn)
        if self._ring is not None:
            self._ring = main._stats
        if self._cache is not None:
            base = main.last_window()
            self._cache = None if base is None else (base, self._cache[1].moved(_mover(fn)))

    def resize(self, slots: int, device: torch.device, main: WindowHistory) -> None:
        """After the ring's ``resize``: the same entries kept, the same way."""
        for sub in self.subs.values():
            sub.resize(slots, device)
        if self._ring is not None:
            self._ring = main._stats
        self._cache = None

    def state(self) -> Dict[str, Tensor]:
        if self._ring is None or not self.subs:
            return {}
        out: Dict[str, Tensor] = {}
        order = sorted(self.subs)
        for i, key in enumerate(order):
            out.update({f'slice{i}_{name}': t for name, t in self.subs[key].state().items()})
        if not out:
            return {}
        device = next(iter(out.values())).device
        out[SLICES_KEY] = torch.tensor(order, dtype=torch.long, device=device).view(-1, 2)
        return out

    def load(self, loaded: Dict[str, Tensor], version: int, device: torch.device,
             main: WindowHistory) -> None:
        """Restore sub-histories saved with the ring (loaded just before); without them, or without
        a ring, the subs are built again from the ring at the next forward."""
        self.reset()
        layout = loaded.get(SLICES_KEY)
        if layout is None or main._stats is None:
            return
        subs = {}
        for i, (start, width) in enumerate(layout.reshape(-1, 2).tolist()):
            mine = {name[len(f'slice{i}_'):]: t for name, t in loaded.items()
                    if name.startswith(f'slice{i}_')}
            if not mine:
                return
            sub = WindowHistory(width, main.slots, self.grad_dtype, self._warn)
            sub.load(mine, version, device)
            subs[(start, width)] = sub
        if any(start + width > main.num_features for start, width in subs):
            raise ValueError(f'CBN slice history has slices {sorted(subs)} beyond the layer\'s '
                             f'{main.num_features} channels')
        self.subs = subs
        self.layout = tuple((start, width, sub.geometry, None)
                            for (start, width), sub in sorted(subs.items()))
        self._ring = main._stats


class SliceWindow:
    """What the layer's forward sees as its history while its input is a concatenation: the ring
    (``main``) plus the sub-histories, advanced, read and written together."""

    def __init__(self, store: SliceHistory, main: WindowHistory, binding: SliceBinding,
                 gradients: Callable):
        self.store, self.main, self.binding, self.gradients = store, main, binding, gradients

    @property
    def open(self) -> bool:
        return self.main.open

    def advance(self) -> None:
        self.main.advance()
        for sub in self.store.subs.values():
            sub.advance()

    def past(self, weights: Optional[SliceBinding], like: Tensor, active_window: int,
             clamp: bool = True) -> PastWindow:
        """The ring's past window with each compensated slice's rows moved to its conv's current
        weights (``weights`` None: as recorded, Naive CBN)."""
        base = self.main.past(None, like, active_window, clamp)
        if weights is None or base.valid.numel() == 0:
            return base
        cache = self.store._cache
        if cache is not None and cache[0] is base:  # a later call of the iteration
            return cache[1]
        means: List[Tensor] = []
        variances: List[Tensor] = []
        at, compensated = 0, False
        for s in weights.compensated:
            sub = self.store.subs.get((s.start, s.width))
            if sub is None:
                continue
            part = sub.past(s.weights, like, active_window, clamp)
            if part.valid.numel() == 0:
                continue
            if s.start > at:
                means.append(base.mean_ct[at:s.start])
                variances.append(base.var_ct[at:s.start])
            means.append(part.mean_ct)
            variances.append(part.var_ct)
            at, compensated = s.stop, compensated or part.compensated
        if at < base.mean_ct.shape[0]:
            means.append(base.mean_ct[at:])
            variances.append(base.var_ct[at:])
        result = PastWindow(torch.cat(means), torch.cat(variances), base.valid, base.recorded,
                            compensated)
        self.store._cache = (base, result)
        return result

    def record(self, like: Tensor, batch_mean: Tensor, batch_var: Tensor, count: float,
               finite: Tensor, weights: Optional[SliceBinding], gradients=None) -> None:
        """The ring's entry as recorded, each sub-history's with its conv's gradients
        (``gradients``, the single-conv callable, is not used: each slice has its own)."""
        self.main.record(like, batch_mean, batch_var, count, finite, None, None)
        slices = {(s.start, s.width): s for s in (weights.compensated if weights else ())}
        for (start, width), sub in self.store.subs.items():
            stop = start + width
            x, mean = like[:, start:stop], batch_mean[start:stop]
            s = slices.get((start, width))
            if s is None:
                sub.record(x, mean, batch_var[start:stop], count, finite, None, None)
            else:
                sub.record(x, mean, batch_var[start:stop], count, finite, s.weights,
                           partial(self.gradients, s.weights, x, mean))
        self.store._ring = self.main._stats


class ConcatHistories:
    """The :class:`SliceHistory` of each call's ring (one, or ``per_call`` of them)."""

    def __init__(self, calls: int, make: Callable[[], SliceHistory]):
        self.stores = [make() for _ in range(max(calls, 1))]

    def __iter__(self):
        return iter(self.stores)

    def __getitem__(self, call: int) -> SliceHistory:
        return self.stores[call]

    def view(self, history: WindowHistory, call: int, status: str, binding, recording: bool,
             gradients: Callable):
        """The history the forward uses: ``history`` itself unless the input is a concatenation."""
        store = self.stores[call]
        if status != BindStatus.CONCAT:
            if recording and store.layout is not None:
                store.reset()  # the ring is written without the slices from here
            return history
        return store.view(history, binding, recording, gradients)

    def reset(self) -> None:
        for store in self.stores:
            store.reset()

    def owns(self, name: str) -> bool:
        """Whether a state-dict key (without the module prefix) is one of these histories'."""
        match = _SLICE_KEY.fullmatch(name)
        if match is None or int(match.group(1) or 0) >= len(self.stores) or (
                match.group(1) is not None and int(match.group(1)) == 0):
            return False
        return match.group(3) is None or match.group(3) in HISTORY_KEYS + HISTORY_PAST

    def state(self) -> Dict[str, Tensor]:
        return {CallHistories.key(call, name): t for call, store in enumerate(self.stores)
                for name, t in store.state().items()}

    def load(self, loaded: Dict[str, Tensor], version: int, device: torch.device,
             mains: CallHistories) -> None:
        for call, store in enumerate(self.stores):
            prefix = CallHistories.key(call, '')
            mine = {name[len(prefix):]: t for name, t in loaded.items()
                    if name.startswith(prefix) and not (call == 0 and name.startswith('call'))}
            store.load(mine, version, device, mains[call])


def _rows(state: Dict[str, Tensor], start: int, stop: int) -> Dict[str, Tensor]:
    """A ring's state restricted to channels ``[start, stop)``, its entries without gradients."""
    mean = state['history_mean'][:, start:stop]
    index = state[HISTORY_INDEX].clone()
    index[3] = -1  # (no conv bias known)
    return {'history_mean': mean, 'history_var': state['history_var'][:, start:stop],
            'history_count': state['history_count'], 'history_mean_ref': torch.zeros_like(mean),
            'history_var_ref': torch.zeros_like(mean),
            'history_compensable': torch.zeros_like(state['history_compensable']),
            HISTORY_INDEX: index}


def _mover(fn):
    """The move of :meth:`WindowHistory.apply` (never below the statistics' precision)."""
    def move(t: Tensor) -> Tensor:
        target = fn(t.new_empty(0))
        dtype = t.dtype if target.dtype in (torch.float16, torch.bfloat16) else target.dtype
        return t.to(device=target.device, dtype=dtype)
    return move
