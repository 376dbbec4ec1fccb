"""Eq. 12 with cross-iteration window statistics, with a closed-form backward.

Gradients flow only through the current iteration's statistics (Section 3.3: "those of the previous
iterations are fixed and do not receive gradients"). With ``k`` iterations in the window each weighing
``1/k`` (Eq. 9), the derivative of the window statistics with respect to the current batch is ``1/k``
times BN's, which gives

    ∂L/∂x_i = γ r [g_i − (1/k)(1/m)(Σ g + x̂_i Σ g x̂)],     r = (σ̄² + ε)^{-1/2},  x̂ = (x − μ̄) r

i.e. BN's training backward evaluated at the window statistics with the batch-mean terms divided by
``k``. On CUDA this is SyncBN's pair of kernels (``batch_norm_backward_reduce`` and ``_elemt`` with a
count of ``k·m``); on CPU one fused reduction and two fused elementwise passes.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .statistics import batch_moments, window_moments

__all__ = ['WindowBatchNormFunction', 'window_batch_norm', 'window_batch_norm_reference']


def _normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
               eps: float) -> Tensor:
    """``γ (x − μ̄)/sqrt(σ̄² + ε) + β`` with torch's inference kernel (ε inside the root, Eq. 12)."""
    return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps,
                            torch.backends.cudnn.enabled)


class WindowBatchNormFunction(torch.autograd.Function):
    """Normalise ``x`` with window statistics; returns ``(y, μ_t, var_t, μ̄, σ̄², k)``.

    Only ``y`` is differentiable; the statistics are returned for the history and running stats.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], past_mean: Tensor,
                past_var: Tensor, past_valid: Tensor, eps: float):
        batch_mean, batch_var = batch_moments(x)
        mean, var, k = window_moments(batch_mean, batch_var, past_mean, past_var, past_valid)
        y = _normalize(x, weight, bias, mean, var, eps)
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, k)
        ctx.eps = eps
        ctx.mark_non_differentiable(batch_mean, batch_var, mean, var, k)
        return y, batch_mean, batch_var, mean, var, k

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y: Tensor, *unused):
        x, weight, mean, invstd, k = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))
        count = x.shape[0] * x.shape[2] * x.shape[3]
        if x.is_cuda:
            # SyncBN's kernels: the elementwise pass divides the sums by a count we make k·m
            sum_dy, sum_dy_xmu, grad_w, grad_b = torch.batch_norm_backward_reduce(
                grad_y, x, mean, invstd, weight, need_x, need_w and weight is not None, need_b)
            grad_x = None
            if need_x:
                counts = (k * count).round().to(torch.int32).reshape(1)
                grad_x = torch.batch_norm_backward_elemt(grad_y, x, mean, invstd, weight, sum_dy,
                                                         sum_dy_xmu, counts)
            return grad_x, grad_w, grad_b, None, None, None, None
        # CPU: one fused reduction (Σg, Σg·x̂), then dx = a·g + b·x + c in two fused passes
        ones = weight if weight is not None else torch.ones_like(mean)
        _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
            grad_y, x, ones, None, None, mean, invstd, True, ctx.eps, [False, True, True])
        grad_x = None
        if need_x:
            gamma = ones.to(invstd.dtype)
            a = gamma * invstd
            scale = a / (k * count)
            b = -scale * invstd * sum_dy_xhat
            c = -scale * (sum_dy - mean * invstd * sum_dy_xhat)
            shape = (1, -1, 1, 1)
            grad_x = torch.addcmul(c.view(shape), x, b.view(shape))
            grad_x.addcmul_(grad_y, a.view(shape))
            grad_x = grad_x.to(x.dtype).contiguous(memory_format=_memory_format(x))
        grad_w = sum_dy_xhat if need_w and weight is not None else None
        grad_b = sum_dy if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def window_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], past_mean: Tensor,
                      past_var: Tensor, past_valid: Tensor,
                      eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Functional form of :class:`WindowBatchNormFunction`."""
    return WindowBatchNormFunction.apply(x, weight, bias, past_mean, past_var, past_valid, eps)


def window_batch_norm_reference(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                                past_mean: Tensor, past_var: Tensor, past_valid: Tensor,
                                eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Autograd reference of :func:`window_batch_norm` in plain tensor operations (for tests)."""
    dims = (0, 2, 3)
    batch_mean = x.mean(dim=dims)
    batch_var = ((x - batch_mean.view(1, -1, 1, 1)) ** 2).mean(dim=dims)
    mean, var, k = window_moments(batch_mean, batch_var, past_mean.detach(), past_var.detach(),
                                  past_valid)
    y = (x - mean.view(1, -1, 1, 1)) / torch.sqrt(var.view(1, -1, 1, 1) + eps)
    if weight is not None:
        y = y * weight.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.view(1, -1, 1, 1)
    return y, batch_mean, batch_var, mean, var, k
