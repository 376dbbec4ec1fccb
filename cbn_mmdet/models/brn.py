"""Batch Renormalization (Ioffe, NeurIPS 2017), a drop-in ``_BatchNorm`` (the BRN baseline of Table 5)."""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from ..ops.statistics import finite_flag, running_factor, update_running_
from ..options import bn_bias_kwargs, is_int, is_real, reject_unknown, require
from .input_checks import check_4d, check_channels, check_like_module
from .torchscript import refuse_torchscript

__all__ = ['BatchRenorm2d']

class BatchRenorm2d(_BatchNorm):
    r"""Batch Renormalization over a 4-D input (Algorithm 1 of Ioffe 2017, arXiv:1702.03275).

    In training, the batch-normalised activation is corrected by the ratio of the mini-batch to the
    running statistics, treated as constants (no gradient flows through :math:`r, d`):

    .. math::
        μ_B = \frac1m\sum_i x_i \qquad σ_B = \sqrt{\frac1m\sum_i (x_i - μ_B)^2 + ε}
        \qquad σ = \sqrt{\text{running\_var} + ε}

        r = \text{stop\_gradient}\big(\text{clip}_{[1/r_{max},\, r_{max}]}(σ_B / σ)\big) \qquad
        d = \text{stop\_gradient}\big(\text{clip}_{[-d_{max},\, d_{max}]}((μ_B - μ) / σ)\big)

        y = γ \Big(\frac{x - μ_B}{σ_B}\, r + d\Big) + β

    where ``m = N·H·W`` per channel and ``μ`` is ``running_mean``. ``r`` and ``d`` use the running
    statistics *before* this batch updates them. With ``r = 1, d = 0`` (``r_max = 1, d_max = 0``) this is
    exactly ``BatchNorm2d`` in training, outputs, gradients and running statistics alike. Without
    clipping, ``y = γ (x - μ)/σ + β``: training normalises like inference.

    **Running statistics.** Updated exactly like torch's BN, which differs from the paper's moving
    average of ``σ_B``: ``running_mean ← (1 - momentum)·running_mean + momentum·μ_B`` and
    ``running_var ← (1 - momentum)·running_var + momentum·\frac{m}{m-1}\text{var}_B`` (the *unbiased*
    batch variance, while ``σ_B`` normalising the batch uses the *biased* one, as BN does), and
    ``momentum=None`` gives the cumulative average. ``σ`` then adds ``ε`` inside the square root as BN's
    inference does, so training with unclipped ``r, d`` and evaluation use the same ``σ``.

    **Schedule.** ``r_max`` and ``d_max`` are relaxed with the iteration count ``t``:

    .. math::
        r_{max}(t) = 1 + (\text{rmax} - 1)\,\text{clip}_{[0, 1]}\Big(
            \frac{t - \text{warmup\_iters}}{\text{rmax\_iters} - \text{warmup\_iters}}\Big) \qquad
        d_{max}(t) = \text{dmax}\cdot\text{clip}_{[0, 1]}\Big(
            \frac{t - \text{warmup\_iters}}{\text{dmax\_iters} - \text{warmup\_iters}}\Big)

    so ``t ≤ warmup_iters`` is plain BN and the limits reach ``rmax`` at ``rmax_iters`` and ``dmax`` at
    ``dmax_iters``. The defaults are the paper's (Sec. 4.1, Inception-v3 on ImageNet): "rmax = 1,
    dmax = 0 (i.e. simply batchnorm) for the first 5000 training steps, after which these were
    gradually relaxed to reach rmax = 3 at 40k steps, and dmax = 5 at 25k steps". The paper does not
    say how they were relaxed; a linear ramp is used here. Those steps were 50 synchronised workers × 32
    images; a detector's 1x schedule (90k iterations) is of the same order, shorter schedules may want
    proportionally shorter ramps.

    ``t`` is ``num_batches_tracked`` *before* this forward: the number of training-mode forwards this
    layer has run (BN's own counter, so it is checkpointed and resumes exactly, and a BN checkpoint
    loads strictly). It counts forwards, not optimizer steps: a layer called several times per
    iteration (a head shared across FPN levels, gradient-accumulation micro-batches) advances that many
    times per iteration; scale the ``*_iters`` accordingly. Loading a BN checkpoint also loads its
    ``num_batches_tracked``, so the schedule continues from that count (zero it to restart the ramp).

    **Evaluation** is exactly ``BatchNorm2d`` with the running statistics (BN's forward is called), so
    ``fuse_conv_bn`` folds it into the preceding conv. **Precision:** float16/bfloat16 input with a
    float32 layer (AMP) computes the statistics and the normalisation in float32 and returns the input
    dtype; the output keeps the input's memory format (channels_last included). Statistics are per
    process, like BN (no cross-GPU synchronisation).

    Args:
        num_features: ``C`` of an ``(N, C, H, W)`` input.
        eps: added to both variances inside the square roots. Default: 1e-5.
        momentum: running-statistics momentum as in BN (``None``: cumulative average). Default: 0.1.
            (The paper used a "relatively fast" update rate for its moving averages.)
        affine: learnable ``γ, β``. Default: True.
        track_running_stats: must be True: ``r`` and ``d`` are defined by the running statistics.
        device, dtype: of the parameters and buffers, as in BN. Default: None.
        rmax: final bound on ``r`` (``≥ 1``). Default: 3.
        dmax: final bound on ``|d|`` (``≥ 0``). Default: 5.
        warmup_iters: iterations (training forwards) with ``r = 1, d = 0``. Default: 5000.
        rmax_iters: iteration at which ``r_max`` reaches ``rmax`` (``≥ warmup_iters``). Default: 40000.
        dmax_iters: iteration at which ``d_max`` reaches ``dmax`` (``≥ warmup_iters``). Default: 25000.
        bias: keyword only, as in BN: ``False`` with ``affine`` learns ``γ`` and no ``β`` (needs a
            torch whose BatchNorm takes ``bias``). Default: True.

    Shape:
        Input and output ``(N, C, H, W)``.

    Example:
        >>> norm_cfg = dict(type='BRN', rmax=3.0, dmax=5.0)   # in any mmdet config
        >>> m = BatchRenorm2d(64, warmup_iters=500, rmax_iters=4000, dmax_iters=2500)
    """
    _abbr_ = 'bn'  # mmcv's build_norm_layer names it like BN (bn1, ...), so BN checkpoints match

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, track_running_stats: bool = True, device=None, dtype=None,
                 rmax: float = 3.0, dmax: float = 5.0, warmup_iters: int = 5000,
                 rmax_iters: int = 40000, dmax_iters: int = 25000, *, bias: bool = True,
                 **unknown):
        reject_unknown('BRN', unknown, BatchRenorm2d.__init__, ' (and requires_grad in norm_cfg)')
        require(is_real(eps) and eps > 0, 'BRN', 'eps', 'a positive number', eps)
        require(momentum is None or is_real(momentum) and 0.0 <= momentum <= 1.0, 'BRN', 'momentum',
                'None or a number in [0, 1]', momentum)
        require(track_running_stats is True, 'BRN', 'track_running_stats',
                'True (r and d are defined by the running statistics)', track_running_stats)
        require(is_real(rmax) and 1.0 <= rmax < float('inf'), 'BRN', 'rmax',
                'a finite number >= 1 (1 = no scale correction, paper: 3)', rmax)
        require(is_real(dmax) and 0.0 <= dmax < float('inf'), 'BRN', 'dmax',
                'a finite number >= 0 (0 = no shift correction, paper: 5)', dmax)
        require(is_int(warmup_iters) and warmup_iters >= 0, 'BRN', 'warmup_iters',
                'an int >= 0 (paper: 5000)', warmup_iters)
        for name, value, paper in (('rmax_iters', rmax_iters, 40000), ('dmax_iters', dmax_iters, 25000)):
            require(is_int(value) and value >= 1 and value >= warmup_iters, 'BRN', name,
                    f'a positive int >= warmup_iters={warmup_iters!r} (paper: {paper})', value)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device,
                         dtype=dtype, **bn_bias_kwargs('BRN', bias))
        self.rmax = float(rmax)
        self.dmax = float(dmax)
        self.warmup_iters = int(warmup_iters)
        self.rmax_iters = int(rmax_iters)
        self.dmax_iters = int(dmax_iters)

    # ------------------------------------------------------------------ schedule
    def limits_at(self, iteration: int) -> Tuple[float, float]:
        """``(r_max, d_max)`` used by a training forward when ``num_batches_tracked == iteration``."""
        return (1.0 + (self.rmax - 1.0) * self._progress(iteration, self.rmax_iters),
                self.dmax * self._progress(iteration, self.dmax_iters))

    @property
    def current_limits(self) -> Tuple[float, float]:
        """``(r_max, d_max)`` the next training forward will use."""
        return self.limits_at(int(self.num_batches_tracked))

    def _progress(self, iteration: int, end: int) -> float:
        if iteration <= self.warmup_iters:
            return 0.0
        if iteration >= end:
            return 1.0
        return (iteration - self.warmup_iters) / (end - self.warmup_iters)

    def extra_repr(self) -> str:
        return (f'{super().extra_repr()}, rmax={self.rmax}, dmax={self.dmax}, '
                f'warmup_iters={self.warmup_iters}, rmax_iters={self.rmax_iters}, '
                f'dmax_iters={self.dmax_iters}')

    def _check_input_dim(self, input: Tensor) -> None:
        check_4d('BRN', input)
        check_channels('BRN', input, self.num_features)

    def __prepare_scriptable__(self):
        """``torch.jit.script`` refuses the layer with an error that names the ways to deploy."""
        refuse_torchscript(self, 'its training forward (the renormalisation and its schedule) and '
                           "BatchNorm's evaluation forward reached through super() are Python that "
                           'TorchScript cannot compile')

    # ------------------------------------------------------------------ forward
    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)  # exactly BN with the running statistics
        check_like_module('BRN', input, self.running_mean)
        if input.numel() == 0:
            # e.g. a mask head with no positive RoI: nothing to measure, nothing counted
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias,
                                False, 0.0, self.eps)
        F._verify_batch_size(input.size())

        r_max, d_max = self.current_limits
        x = input.float() if input.dtype in (torch.float16, torch.bfloat16) else input
        var_b, mean_b = torch.var_mean(x, dim=(0, 2, 3), correction=0)
        inv_std_b = torch.rsqrt(var_b + self.eps)
        with torch.no_grad():
            sigma = torch.sqrt(self.running_var.to(x.dtype) + self.eps)
            r = (torch.sqrt(var_b + self.eps) / sigma).clamp(1.0 / r_max, r_max)
            d = ((mean_b - self.running_mean.to(x.dtype)) / sigma).clamp(-d_max, d_max)
        # y = γ((x - μ_B) / σ_B · r + d) + β = x · scale + shift, per channel
        scale = inv_std_b * r
        shift = d - mean_b * scale
        if self.weight is not None:
            scale = scale * self.weight
            shift = shift * self.weight
        if self.bias is not None:  # (None with bias=False: γ without β)
            shift = shift + self.bias
        y = x * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        self._update_running_stats(mean_b.detach(), var_b.detach(), x.numel() // x.shape[1])
        return y.to(input.dtype)

    def _update_running_stats(self, mean_b: Tensor, var_b: Tensor, count: int) -> None:
        """BN's update: biased batch variance made unbiased with ``m / (m - 1)``. Unlike BN's, a
        batch with non-finite moments is neither averaged in nor counted: r and d of every later
        batch would be NaN."""
        with torch.no_grad():
            finite = finite_flag(var_b)  # (a finite variance means finite values and mean)
            self.num_batches_tracked.add_(finite)
            factor = running_factor(self.momentum, self.num_batches_tracked, self.running_mean.dtype)
            unbiased = var_b * (count / max(count - 1, 1))
            update_running_((self.running_mean, self.running_var), (mean_b, unbiased), finite, factor)
