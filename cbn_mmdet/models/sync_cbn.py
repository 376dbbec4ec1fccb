"""SyncCBN: Cross-Iteration Batch Normalization over the batches of all processes."""
import contextlib
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..ops.statistics import all_finite, batch_moments, pool_moments
from ..ops.window_norm import WindowBatchNormFunction
from .cbn import CrossIterationBatchNorm2d, WindowInput, _autocast_disabled
from .window_history import PROCESSES_KEY, RANK_KEY, rank_key
from .convert import replace_norm_layers

__all__ = ['SyncCrossIterationBatchNorm2d', 'gathered_histories', 'convert_to_sync_cbn']

class SyncCrossIterationBatchNorm2d(CrossIterationBatchNorm2d):
    r"""CBN applied to the concatenation of the batches of all processes in a group.

    The window statistics are those CBN would compute from the union of the processes' batches, in
    the current and the past iterations. Each process keeps the history of its own batches and
    compensates it with its own ``∂μ/∂θ, ∂var/∂θ`` (Eqs. 7-8 are linear in them, so pooling the
    processes' compensated moments gives the compensated moments of the union); one all-gather of
    per-channel moments per call pools the current batches and the past entries, before Eq. 10 and
    the window average, and the backward all-reduces two per-channel sums like SyncBN. Weight-sized
    tensors are communicated only when a checkpoint is saved (see below).

    Outside a distributed run, or in a group of one process, it is CBN (and says so once). In
    evaluation it is BN with the running statistics, which are the same on every process.

    **Checkpoints.** The history is per process (the ring and, with ``concat='compensate'``, the
    per-slice histories): ``state_dict()`` holds this process's, and inside
    :func:`gathered_histories` (called on every process) every process's, so that rank 0's checkpoint
    restores each process's own history when loaded on the same number of processes. mmengine's
    ``Runner.save_checkpoint`` gathers them itself (:mod:`cbn_mmdet.openmmlab`).

    Args:
        num_features: ``C`` of an ``(N, C, H, W)`` input.
        process_group: the processes whose batches are normalised together, as in torch's
            ``SyncBatchNorm`` (None: all). Default: None.
        Other arguments: as :class:`CrossIterationBatchNorm2d` (BN's in BN's order, then CBN's,
            ``bias`` keyword only).

    Example:
        >>> norm_cfg = dict(type='SyncCBN', window=4)   # in any mmdet config
    """

    _option_owner = 'SyncCBN'
    _extra_options = ', process_group'

    def __init__(self, num_features: int, *args, process_group=None, **kwargs):
        super().__init__(num_features, *args, **kwargs)
        self.process_group = process_group
        self._rank_states: Optional[List[Dict[str, Tensor]]] = None  # set by gathered_histories

    def _statistics_group(self):
        if not (dist.is_available() and dist.is_initialized()):
            self._warn_once('one_process', 'SyncCBN outside a distributed run normalises with this '
                            "process's batches, like CBN")
            return None
        group = self.process_group or dist.group.WORLD
        if dist.get_world_size(group) == 1:
            self._warn_once('one_process', 'SyncCBN in a group of one process normalises with its '
                            'batches, like CBN')
            return None
        return group

    def _pool_across(self, group, local: WindowInput) -> WindowInput:
        """The moments of all processes' current batches and past entries (one all-gather);
        ``local.past_count`` by entry."""
        c, slots = self.num_features, self._slots
        rows = local.batch_mean.new_zeros((1 + slots, 2 * c + 1))
        rows[0] = torch.cat([local.batch_mean.new_full((1, ), local.count), local.batch_mean,
                             local.batch_var])
        if local.past_count.numel():
            # the past unclamped (Eq. 10 holds for the union, not for each process's share)
            rows[1:] = torch.cat([local.past_count.unsqueeze(1), local.past_mean.t(),
                                  local.past_var.t()], 1)
        gathered = _all_gather(rows, group)
        count, mean, var = pool_moments(gathered[..., 0], gathered[..., 1:1 + c],
                                        gathered[..., 1 + c:])
        return WindowInput(mean[0], var[0], count[0], all_finite(mean[0], var[0]), mean[1:].t(),
                           var[1:].clamp_min(0.0).t(), (count[1:] > 0).to(mean.dtype),
                           count[1:].sum())

    def _batch_norm(self, input: Tensor, group, update: bool, call: int = 0) -> Tensor:
        if group is None:
            return super()._batch_norm(input, group, update, call)
        with torch.no_grad(), _autocast_disabled(input.device.type):  # SyncBN on the union
            batch_mean, batch_var = batch_moments(input)
            none = batch_mean.new_zeros((self.num_features, 0))
            local = WindowInput(batch_mean, batch_var,
                                float(input.shape[0] * input.shape[2] * input.shape[3]),
                                all_finite(batch_mean, batch_var), none, none, none[0], none[0])
            w = self._pool_across(group, local)
            if update:
                self._update_running_stats(w.batch_mean, w.batch_var, w.batch_mean, w.batch_var,
                                           w.count, w.past_count, w.finite, call)
        return WindowBatchNormFunction.apply(input, self.weight, self.bias, w.batch_mean,
                                             w.batch_var, w.batch_mean.new_ones(()), self.eps, group,
                                             w.count)

    # ------------------------------------------------------------------ state dict
    def _own_history_state(self) -> Dict[str, Tensor]:
        """This process's history tensors by state-dict key: the rings and, for a concatenated
        input (``concat='compensate'``), the per-slice histories."""
        return {**self.call_histories.state(), **self.slice_histories.state()}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        rank, processes = _rank_and_processes()
        gathered = self._rank_states is not None
        if gathered:
            processes = len(self._rank_states)
            for r, state in enumerate(self._rank_states):
                for key, t in state.items():
                    destination[prefix + rank_key(r, key)] = t
        if gathered or self.call_histories.state():
            destination[prefix + PROCESSES_KEY] = torch.tensor([processes, rank, int(gathered)])

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        ours = {k[len(prefix):]: v for k, v in state_dict.items()
                if k.startswith(prefix) and self.call_histories.is_key(k)}
        saved = ours.get(PROCESSES_KEY)
        processes, gathered = (1, False) if saved is None else (int(saved[0]), bool(saved[2]))
        rank, now = _rank_and_processes()
        history: Dict[str, Tensor] = {}
        note = ''
        if gathered and processes == now:
            mine = rank_key(rank, '')
            history = {k[len(mine):]: t for k, t in ours.items() if k.startswith(mine)}
        elif gathered:
            note = (f'the checkpoint holds the histories of {processes} processes and this run has '
                    f'{now}: the window restarts (each process keeps the history of its own '
                    'batches, which cannot be re-divided)')
        elif processes > 1:
            note = (f"the checkpoint holds one process's history of a {processes}-process run "
                    '(saved without gathered_histories()): the window restarts')
        else:  # a one-process history (CBN's, or SyncCBN's on one process)
            history = {k: t for k, t in ours.items()
                       if k != PROCESSES_KEY and not RANK_KEY.fullmatch(k)}
        if note:
            self._warn_once('checkpoint_processes', note)
        rest = {k: v for k, v in state_dict.items()
                if not (k.startswith(prefix) and k[len(prefix):] in ours)}
        rest.update({prefix + k: t for k, t in history.items()})
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        if not gathered and processes == 1 and rank > 0 and now > 1:
            # rank 0 holds the saved iterations; the others the same iterations without values,
            # so that the union's window is exactly the saved one
            for h in self.call_histories:
                h.drop_values()


def _rank_and_processes() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_gather(rows: Tensor, group) -> Tensor:
    """``(processes, *rows.shape)``: every process's ``rows`` (gloo has no all_gather_into_tensor)."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == 'gloo':
        parts = [torch.empty_like(rows) for _ in range(world)]
        dist.all_gather(parts, rows, group)
        return torch.stack(parts)
    out = rows.new_empty((world, ) + tuple(rows.shape))
    dist.all_gather_into_tensor(out, rows.contiguous(), group)
    return out


@contextlib.contextmanager
def gathered_histories(model: nn.Module) -> Iterator[None]:
    """Inside, ``model.state_dict()`` holds every process's SyncCBN histories (call on all processes).

    Example:
        >>> with gathered_histories(model):
        ...     if dist.get_rank() == 0:
        ...         torch.save(model.state_dict(), 'ckpt.pth')
    """
    layers = [m for m in model.modules() if isinstance(m, SyncCrossIterationBatchNorm2d)]
    if not layers or _rank_and_processes()[1] == 1:
        yield
        return
    local = [{key: t.detach().cpu() for key, t in layer._own_history_state().items()}
             for layer in layers]
    gathered: List = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    try:
        for i, layer in enumerate(layers):
            layer._rank_states = [states[i] for states in gathered]
        yield
    finally:
        for layer in layers:
            layer._rank_states = None


def convert_to_sync_cbn(module: nn.Module, process_group=None) -> nn.Module:
    """Turn the CBN layers under ``module`` into SyncCBN with the same options, tensors and history,
    in place (the root itself is never replaced). Returns ``module``."""
    def make(old: CrossIterationBatchNorm2d) -> SyncCrossIterationBatchNorm2d:
        new = SyncCrossIterationBatchNorm2d(
            old.num_features, eps=old.eps, momentum=old.momentum, affine=old.affine,
            track_running_stats=old.track_running_stats, window=old.window,
            compensate=old.compensate, fallback=old.fallback, running_stats=old.running_stats,
            statistics_gradients=old.statistics_gradients, subsample=old.subsample,
            history_dtype=old.history_dtype, var_grad_dtype=old.var_grad_dtype,
            per_call=old.per_call, monitor=old.monitor, concat=old.concat,
            process_group=process_group)
        new.active_window = old.active_window
        for name, buffer in old.named_buffers(recurse=False):  # the other calls' running stats
            if name.startswith('call'):
                setattr(new, name, buffer)
        # this process's history is what a SyncCBN process keeps
        new.call_histories, new.history, new._producer = (old.call_histories, old.history,
                                                          old._producer)
        new.slice_histories, new._concat_producer = old.slice_histories, old._concat_producer
        return new

    replace_norm_layers(module, make, (CrossIterationBatchNorm2d, ))
    return module
