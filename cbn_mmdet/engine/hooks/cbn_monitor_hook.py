"""Log how large CBN's Taylor compensation is, per layer, so that too large k or lr shows up."""
from typing import Dict, List, Tuple

import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

from ...models.cbn import CrossIterationBatchNorm2d
from ...options import reject_unknown
from .runner_model import bare_model

__all__ = ['CBNMonitorHook']


@HOOKS.register_module()
class CBNMonitorHook(Hook):
    """Turn on every CBN layer's ``monitor`` and log the correction size every ``interval`` iterations.

    For each layer the correction is ``mean_{τ,c} |μ̃ − μ|/σ`` (mean) and ``mean_{τ,c} |ṽ − v|/v``
    (variance) over the past iterations in its window: how far Eqs. 7-8 moved the recorded statistics.
    Values near 1 mean the weights moved so much within the window that a first-order Taylor step is
    doubtful: lower the window or the learning rate. Logged as scalars ``cbn/correction_mean_{avg,max}``
    and ``cbn/correction_var_{avg,max}`` (visible in the log and in ``vis_data``), with the worst layer's
    name every ``interval`` iterations.

    Args:
        interval (int): log every ``interval`` training iterations. Defaults to 50.
    """
    priority = 'LOW'

    def __init__(self, interval: int = 50, **unknown) -> None:
        reject_unknown('CBNMonitorHook', unknown, CBNMonitorHook.__init__)
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
            raise ValueError(f'CBNMonitorHook interval must be a positive int, got {interval!r}')
        self.interval = interval
        self._layers: List[Tuple[str, CrossIterationBatchNorm2d]] = []

    def before_train(self, runner) -> None:
        model = bare_model(runner)
        self._layers = [(n, m) for n, m in model.named_modules()
                        if isinstance(m, CrossIterationBatchNorm2d)]
        for _, layer in self._layers:
            layer.monitor = True

    def after_train_iter(self, runner, batch_idx: int, data_batch=None, outputs=None) -> None:
        if not self.every_n_train_iters(runner, self.interval):
            return
        sizes: Dict[str, Tuple[float, float]] = {}
        for name, layer in self._layers:
            if layer.last_correction is not None:
                sizes[name] = (float(layer.last_correction['mean']),
                               float(layer.last_correction['var']))
                layer.last_correction = None
        if not sizes:
            return
        means = torch.tensor([v[0] for v in sizes.values()])
        variances = torch.tensor([v[1] for v in sizes.values()])
        hub = runner.message_hub
        hub.update_scalar('train/cbn/correction_mean_avg', float(means.mean()))
        hub.update_scalar('train/cbn/correction_mean_max', float(means.max()))
        hub.update_scalar('train/cbn/correction_var_avg', float(variances.mean()))
        hub.update_scalar('train/cbn/correction_var_max', float(variances.max()))
        worst = max(sizes, key=lambda n: sizes[n][1])
        runner.logger.info(f'CBNMonitorHook: {len(sizes)} layers compensated; correction |Δμ|/σ avg '
                           f'{float(means.mean()):.3g} max {float(means.max()):.3g}, |Δvar|/var avg '
                           f'{float(variances.mean()):.3g} max {float(variances.max()):.3g} '
                           f'(largest: {worst})')
