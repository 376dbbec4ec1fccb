"""Burn-in of the CBN window (Section 3.3): ``k = 1`` while the weights change fast, then ``k``."""
import math
from typing import List, Optional, Union

from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...models.cbn import CrossIterationBatchNorm2d
from ...options import is_real, reject_unknown
from .runner_model import bare_model

__all__ = ['CBNBurnInHook', 'auto_window']


def auto_window(images_per_gpu: int) -> int:
    """The paper's suggestion ``k = min(⌈16 / images per GPU⌉, 8)`` (Section 4.1, Table 3)."""
    return min(math.ceil(16 / images_per_gpu), 8)


@HOOKS.register_module()
class CBNBurnInHook(Hook):
    """Set every CBN layer's window from the training progress, at every iteration.

    The window is ``1`` (plain BN) for the first ``burn_in`` epochs (or iterations), then ``window``;
    with ``ramp > 0`` it grows linearly from 2 to ``window`` over ``ramp`` more epochs/iterations. It
    is recomputed from ``runner.iter`` before each training iteration, so a resumed run is at the same
    point of the schedule as an uninterrupted one. CBN does not record history while its window is 1,
    so after the switch the window fills over ``window - 1`` iterations.

    Args:
        burn_in (int | float): length of the burn-in, in epochs (``by_epoch=True``) or
            iterations. Paper: 3 epochs on COCO, 25 on ImageNet. Defaults to 3.
        window (int | str, optional): ``k`` after burn-in. ``None`` keeps each layer's own
            ``window`` (its ``norm_cfg``: the window is stated once, in the model); an int or
            ``'auto'`` (``min(⌈16 / images per GPU⌉, 8)`` from the train dataloader's batch size)
            resizes every CBN layer to it. Defaults to None.
        by_epoch (bool): whether ``burn_in`` and ``ramp`` count epochs (fractional epochs allowed)
            or iterations. Defaults to True.
        ramp (int | float): length of the linear ramp after burn-in (0: switch at once).
            Defaults to 0.

    Example:
        >>> custom_hooks = [dict(type='CBNBurnInHook', burn_in=3)]
    """
    priority = 'NORMAL'

    def __init__(self, burn_in: Union[int, float] = 3, window: Union[int, str, None] = None,
                 by_epoch: bool = True, ramp: Union[int, float] = 0, **unknown) -> None:
        reject_unknown('CBNBurnInHook', unknown, CBNBurnInHook.__init__)
        if not is_real(burn_in) or burn_in < 0:
            raise ValueError(f'CBNBurnInHook burn_in must be a number >= 0, got {burn_in!r}')
        if not is_real(ramp) or ramp < 0:
            raise ValueError(f'CBNBurnInHook ramp must be a number >= 0, got {ramp!r}')
        if not isinstance(by_epoch, bool):
            raise TypeError(f'CBNBurnInHook by_epoch must be True or False, got {by_epoch!r}')
        if not (window is None or window == 'auto' or
                (isinstance(window, int) and not isinstance(window, bool) and window >= 1)):
            raise ValueError("CBNBurnInHook window must be None, 'auto' or a positive int, got "
                             f'{window!r}')
        if not by_epoch and (burn_in != int(burn_in) or ramp != int(ramp)):
            raise ValueError('CBNBurnInHook burn_in and ramp count iterations (by_epoch=False): '
                             f'they must be whole numbers, got burn_in={burn_in!r}, ramp={ramp!r}')
        self.burn_in = burn_in
        self.window = window
        self.by_epoch = by_epoch
        self.ramp = ramp
        self._norms: List[CrossIterationBatchNorm2d] = []
        self._iters_per_epoch: Optional[int] = None
        self._current: Optional[int] = None

    def before_train(self, runner) -> None:
        model = bare_model(runner)
        self._norms = [m for m in model.modules() if isinstance(m, CrossIterationBatchNorm2d)]
        if not self._norms:
            runner.logger.warning('CBNBurnInHook: the model has no CBN layer; the hook does nothing')
            return
        if self.by_epoch:
            self._iters_per_epoch = len(runner.train_dataloader)
        target = self.window
        if target == 'auto':
            batch_size = runner.train_dataloader.batch_size
            target = auto_window(batch_size)
            runner.logger.info(f'CBNBurnInHook: window=auto -> {target} for {batch_size} images per '
                               'GPU (min(ceil(16 / images per GPU), 8))')
        if target is not None:
            for norm in self._norms:
                norm.set_window(target)
        self._current = None

    def window_at(self, iteration: int, target: int) -> int:
        """The window at a training iteration (0-based) for a layer whose full window is ``target``."""
        progress = iteration / self._iters_per_epoch if self.by_epoch else iteration
        if progress < self.burn_in:
            return 1
        if self.ramp == 0 or target <= 2:
            return target
        return min(target, 2 + int((target - 2) * (progress - self.burn_in) / self.ramp))

    def before_train_iter(self, runner, batch_idx: int, data_batch=None) -> None:
        if not self._norms:
            return
        windows = []
        for norm in self._norms:
            norm.active_window = self.window_at(runner.iter, norm.window)
            windows.append(norm.active_window)
        current = max(windows)
        if current != self._current:
            where = (f'epoch {runner.iter / self._iters_per_epoch:.2f}' if self.by_epoch else
                     f'iteration {runner.iter}')
            state = 'BN (burn-in)' if current == 1 else f'CBN with window {current}'
            runner.logger.info(f'CBNBurnInHook: {len(self._norms)} CBN layers now use {state} at '
                               f'{where} (iter {runner.iter})')
            self._current = current
