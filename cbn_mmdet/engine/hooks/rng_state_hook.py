"""Save the random-number generators with each checkpoint so that a resumed run continues exactly."""
import random
from typing import Optional

import numpy as np
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...options import reject_unknown

__all__ = ['RNGStateHook']


@HOOKS.register_module()
class RNGStateHook(Hook):
    """Checkpoint the python, numpy and torch RNG states; restore them at the first resumed iteration.

    mmengine 0.10 checkpoints the model, optimizer, schedulers and counters but not the generators,
    so after ``--resume`` anchor/RoI sampling (``torch.randperm``) and augmentations draw different
    numbers than the uninterrupted run would have. This hook stores the states in
    ``checkpoint['rng_state']`` and puts them back right before the first new batch is fetched after a
    resume — after an iteration-based loop has skipped the already-trained batches, which itself
    draws random numbers in the data pipeline. With ``randomness=dict(seed=..., deterministic=True)`` a resumed CPU
    run then reproduces the uninterrupted run's losses bit for bit (tested). Data-loader workers
    (``num_workers > 0``) have their own generators, seeded by mmengine per worker and epoch; they are
    not covered beyond that seeding.
    """
    priority = 'VERY_HIGH'

    def __init__(self, **unknown) -> None:
        reject_unknown('RNGStateHook', unknown, RNGStateHook.__init__)
        self._pending: Optional[dict] = None

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        state = dict(python=random.getstate(), numpy=np.random.get_state(),
                     torch=torch.get_rng_state())
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state['cuda'] = torch.cuda.get_rng_state_all()
        checkpoint['rng_state'] = state

    def after_load_checkpoint(self, runner, checkpoint: dict) -> None:
        self._pending = checkpoint.get('rng_state')
        if self._pending is None:
            runner.logger.warning('RNGStateHook: the checkpoint has no RNG state; the resumed run '
                                  'will not repeat the random draws of an uninterrupted one')

    def before_train_epoch(self, runner) -> None:
        if self._pending is None:
            return
        state, self._pending = self._pending, None
        loop = runner.train_loop
        if hasattr(loop, 'dataloader_iterator') and runner.iter > 0:
            # IterBasedTrainLoop skips the trained batches after this hook (drawing random numbers in
            # the pipeline): restore right before the first new batch is fetched instead.
            loop.dataloader_iterator = _RestoreBeforeFetch(loop.dataloader_iterator, runner.iter,
                                                           state)
        else:
            _set_rng_state(state)


def _set_rng_state(state: dict) -> None:
    random.setstate(state['python'])
    np.random.set_state(state['numpy'])
    torch.set_rng_state(state['torch'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


class _RestoreBeforeFetch:
    """Iterator wrapper: pass ``skip`` items through, then restore the RNG state and stand aside."""

    def __init__(self, iterator, skip: int, state: dict) -> None:
        self._iterator, self._skip, self._state = iterator, skip, state

    def __iter__(self):
        return self

    def __next__(self):
        if self._skip == 0 and self._state is not None:
            _set_rng_state(self._state)
            self._state = None
        self._skip -= 1
        return next(self._iterator)

    def __getattr__(self, name):
        return getattr(self._iterator, name)
