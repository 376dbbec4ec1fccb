"""Switch BN layers to another normalizer during training (the paper's Table 7: BN → SyncBN)."""
from typing import Optional, Sequence, Union

import torch.nn as nn
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.registry import HOOKS, MODELS
from torch.nn.modules.batchnorm import _BatchNorm

from ...models.convert import replace_norm_layers
from ...options import reject_unknown
from .runner_model import bare_model

__all__ = ['NormSwitchHook', 'switch_norm_layers']


def switch_norm_layers(root: nn.Module, to_cfg: dict, from_types: Sequence[type]) -> int:
    """Replace every module of exactly one of ``from_types`` under ``root`` by ``to_cfg``'s type.

    The new layer takes over the same tensors and the training flag (see
    :func:`cbn_mmdet.models.replace_norm_layers`) and the old one's ``eps``/``momentum``.
    Returns the count.
    """
    cfg = dict(to_cfg)
    layer_cls = MODELS.get(cfg.pop('type'))

    def make(child):
        return layer_cls(child.num_features, eps=child.eps, momentum=child.momentum,
                         affine=child.affine, track_running_stats=child.track_running_stats, **cfg)

    return replace_norm_layers(root, make, from_types)


@HOOKS.register_module()
class NormSwitchHook(Hook):
    """At a given epoch (or iteration), swap the BN layers in chosen parts of the model.

    Table 7 of the paper trains with BN and switches to SyncBN at epoch 8, 9, 10 or 11. The swap
    happens before the epoch (mmengine re-applies ``norm_eval``/``frozen_stages`` afterwards) and is
    derived from ``runner.epoch``/``runner.iter``, so a run resumed after the switch point switches
    again before its first iteration. Parameters, buffers and optimizer state are handed over as the
    very same tensors.

    Args:
        switch_epoch (int, optional): first epoch (0-based, as ``runner.epoch``) trained with the
            new normalizer. Table 7's "switch at epoch 8" of a 12-epoch schedule is
            ``switch_epoch=8``. Defaults to None.
        switch_iter (int, optional): alternatively, the first iteration with the new normalizer.
            Defaults to None. Exactly one of the two is given.
        to (str | dict): norm config of the new layers, e.g. ``dict(type='SyncBN')`` or
            ``dict(type='CBN', window=4)`` (any ``_BatchNorm`` taking BN's constructor arguments).
            Defaults to ``'SyncBN'``.
        parts (Sequence[str]): dotted module paths inside the model to switch (``''`` = the whole
            model), e.g. ``('roi_head.bbox_head', 'neck')``. Defaults to ``('',)``.
        from_types (Sequence[str]): norm types (registry names) to replace. Defaults to
            ``('BN',)``.
    """
    priority = 'ABOVE_NORMAL'

    def __init__(self, switch_epoch: Optional[int] = None, switch_iter: Optional[int] = None,
                 to: Union[str, dict] = 'SyncBN', parts: Sequence[str] = ('', ),
                 from_types: Sequence[str] = ('BN', ), **unknown) -> None:
        reject_unknown('NormSwitchHook', unknown, NormSwitchHook.__init__)
        if (switch_epoch is None) == (switch_iter is None):
            raise ValueError('NormSwitchHook needs exactly one of switch_epoch and switch_iter, got '
                             f'switch_epoch={switch_epoch!r}, switch_iter={switch_iter!r}')
        for name, value in (('switch_epoch', switch_epoch), ('switch_iter', switch_iter)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or value < 0):
                raise ValueError(f'NormSwitchHook {name} must be an int >= 0, got {value!r}')
        to_cfg = dict(type=to) if isinstance(to, str) else dict(to)
        if 'type' not in to_cfg:
            raise ValueError(f"NormSwitchHook to must name a norm type, got {to!r}")
        to_cls = MODELS.get(to_cfg['type'])
        if to_cls is None or not issubclass(to_cls, _BatchNorm):
            raise ValueError(f"NormSwitchHook to={to_cfg['type']!r} is not a registered _BatchNorm "
                             "type (e.g. 'SyncBN', 'CBN', 'BN')")
        if isinstance(parts, str):
            parts = (parts, )
        self.from_classes = []
        for type_name in from_types:
            cls = MODELS.get(type_name)
            if cls is None or not issubclass(cls, _BatchNorm):
                raise ValueError(f'NormSwitchHook from_types entry {type_name!r} is not a registered '
                                 "_BatchNorm type (e.g. 'BN')")
            self.from_classes.append(cls)
        self.switch_epoch, self.switch_iter = switch_epoch, switch_iter
        self.to_cfg, self.parts = to_cfg, tuple(parts)
        self.switched = False

    def before_train(self, runner) -> None:
        if self.to_cfg['type'] in ('SyncBN', 'MMSyncBN') and get_world_size() == 1:
            raise RuntimeError(
                f"NormSwitchHook to={self.to_cfg['type']!r} needs a distributed run (SyncBN averages "
                'statistics across processes; on one process it would be plain BN). Launch with '
                'tools/dist_train.sh CONFIG GPUS, or remove the hook.')
        model = bare_model(runner)
        for part in self.parts:
            if part:
                model.get_submodule(part)  # fail now, not at the switch, on a typo

    def _due(self, epoch: int, iteration: int) -> bool:
        if self.switch_epoch is not None:
            return epoch >= self.switch_epoch
        return iteration >= self.switch_iter

    def _switch(self, runner, when: str) -> None:
        model = bare_model(runner)
        total = 0
        for part in self.parts:
            total += switch_norm_layers(model.get_submodule(part) if part else model, self.to_cfg,
                                        tuple(self.from_classes))
        self.switched = True
        runner.logger.info(f"NormSwitchHook: switched {total} norm layers in "
                           f"{[p or '<model>' for p in self.parts]} to {self.to_cfg} {when}")

    def _maybe_switch(self, runner) -> None:
        if not self.switched and self._due(runner.epoch, runner.iter):
            self._switch(runner, f'at epoch {runner.epoch}, iter {runner.iter}')

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        """On ``--resume`` past the switch point, switch before the checkpoint's state is loaded, so
        the new layers' state (e.g. CBN's history) is restored instead of dropped as unexpected keys.
        (mmengine calls this hook between reading a checkpoint and loading it into the model.)"""
        if self.switched or not getattr(runner, '_resume', False):
            return  # load_from starts a new run at its own epoch 0: nothing to switch yet
        meta = checkpoint.get('meta', {})
        epoch, iteration = meta.get('epoch', 0), meta.get('iter', 0)
        if self._due(epoch, iteration):
            self._switch(runner, f'before resuming from epoch {epoch}, iter {iteration}')

    def before_train_epoch(self, runner) -> None:
        self._maybe_switch(runner)

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        self._maybe_switch(runner)
