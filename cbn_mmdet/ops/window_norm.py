"""Eq. 12 with cross-iteration window statistics, with a closed-form backward.

Gradients flow only through the current iteration's statistics (Section 3.3: "those of the previous
iterations are fixed and do not receive gradients"). With ``k`` iterations in the window each weighing
``1/k`` (Eq. 9), the derivative of the window statistics with respect to the current batch is ``1/k``
times BN's, which gives

    ∂L/∂x_i = γ r [g_i − (1/k)(1/m)(Σ g + x̂_i Σ g x̂)],     r = (σ̄² + ε)^{-1/2},  x̂ = (x − μ̄) r

i.e. BN's training backward evaluated at the window statistics with the batch-mean terms divided by
``k``. On CUDA this is SyncBN's pair of kernels (``batch_norm_backward_reduce`` and ``_elemt`` with a
count of ``k·m``), reached through :data:`cuda_kernels` so that CPU tests can substitute stand-ins
with the kernels' dtype rules; on CPU one fused reduction and two fused elementwise passes.

Statistics are float32 (float64 for float64 input) whatever the precision of the input and of ``γ, β``
(a half-precision module, or AMP), as in torch's BN kernels.

**Double backward** (``create_graph=True``, e.g. a gradient penalty): the backward is then the same
formula in differentiable tensor operations, with ``r`` and ``x̂`` functions of ``x`` through
``μ̄(x) = μ̄ + δμ/k`` and ``σ̄²(x) = σ̄² + (δν − δμ²/k)/k``, where ``δμ, δν`` are the batch's first and
second moments about ``μ̄`` minus their own values: zero, with the batch moments' derivatives. This is
the window of Eq. 9 with the past held constant, so its derivatives of every order are those of
``γ (x − μ̄)/sqrt(σ̄² + ε) + β``. With a process group the sums are all-reduced by a differentiable
all-reduce (its backward is an all-reduce too), so every process must run the double backward.
"""
from types import SimpleNamespace
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import fused
from .statistics import batch_moments, window_moments

__all__ = ['WindowBatchNormFunction', 'window_batch_norm', 'window_batch_norm_reference',
           'cuda_kernels', 'statistics_dtype']

#: The CUDA kernels of the backward (torch's, used by SyncBatchNorm) and when they apply. Tests point
#: these at Python implementations with the same dtype and shape rules, to run this path on CPU.
cuda_kernels = SimpleNamespace(applies=lambda x: x.is_cuda,
                               backward_reduce=torch.batch_norm_backward_reduce,
                               backward_elemt=torch.batch_norm_backward_elemt)


def statistics_dtype(x: Tensor) -> torch.dtype:
    """Precision of CBN's statistics for an input ``x``: float64 for float64, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _normalize(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor, var: Tensor,
               eps: float) -> Tensor:
    """``γ (x − μ̄)/sqrt(σ̄² + ε) + β`` with torch's inference kernel (ε inside the root, Eq. 12).

    ``γ, β`` are taken in the statistics' precision: torch's kernels accept a reduced-precision input
    with float32 parameters and statistics, not reduced-precision parameters with float32 statistics.
    """
    weight = None if weight is None else weight.to(mean.dtype)
    bias = None if bias is None else bias.to(mean.dtype)
    if x.is_cuda:  # (cuDNN's inference kernel where torch would choose it)
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)
    return torch.native_batch_norm(x, weight, bias, mean, var, False, 0.0, eps)[0]


class WindowBatchNormFunction(torch.autograd.Function):
    """``y = γ (x − μ̄)/sqrt(σ̄² + ε) + β`` for window statistics ``(μ̄, σ̄², k)`` computed by the caller
    from ``x``'s own moments and the past (:func:`window_batch_norm`); the backward treats the past as
    constants, so ``∂μ̄/∂x`` and ``∂σ̄²/∂x`` are ``1/k`` times BN's.

    With a process ``group``, the current iteration's statistics are those of all processes' batches
    (``count`` values in all, this process's ``x`` possibly empty): the backward all-reduces the two
    per-channel sums like SyncBN's and divides by ``k·count``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], mean: Tensor,
                var: Tensor, inv_k: Tensor, eps: float, group=None,
                count: Optional[float] = None, invstd: Optional[Tensor] = None) -> Tensor:
        if not x.numel():
            y = torch.empty_like(x)
        elif (invstd is not None and x.dtype == mean.dtype and fused.applies(mean) is not None
              and all(p is None or p.dtype == x.dtype for p in (weight, bias))):
            # the fused ops' step (CPU, full precision), as the one-call step normalises
            y = fused.ops().window_norm_forward(x, weight, bias, mean, var, invstd, eps)
        else:
            y = _normalize(x, weight, bias, mean, var, eps)
        if invstd is None:
            invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, inv_k)
        ctx.eps, ctx.group = eps, group
        ctx.count = x.shape[0] * x.shape[2] * x.shape[3] if count is None else count
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor, *unused):
        if torch.is_grad_enabled():  # create_graph=True: the gradients get derivatives themselves
            return _differentiable_backward(ctx, grad_y)
        # grad mode is off here unless create_graph: the fused kernels, outside any graph
        x, weight, mean, invstd, inv_k = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        need_w = need_w and weight is not None
        need_b = need_b and weight is not None  # no β without γ (β may be None: bias=False)
        grad_y = grad_y.contiguous(memory_format=_memory_format(x))
        count, group = ctx.count, ctx.group
        # γ in the statistics' precision, as SyncBN does for its elementwise kernel
        gamma = None if weight is None else weight.to(mean.dtype)
        if x.numel() == 0:
            # nothing here, but the other processes' all-reduce needs this one's (zero) sums
            if group is not None and need_x:
                _all_reduce_sums(mean.new_zeros(mean.shape), mean.new_zeros(mean.shape), group)
            grad_x = torch.empty_like(x) if need_x else None
            grad_w = grad_b = mean.new_zeros(mean.shape)
        elif cuda_kernels.applies(x):
            # SyncBN's kernels: the elementwise pass divides the sums by a count we make k·m
            sum_dy, sum_dy_xmu, grad_w, grad_b = cuda_kernels.backward_reduce(
                grad_y, x, mean, invstd, gamma, need_x, need_w, need_b)
            grad_x = None
            if need_x:
                if group is not None:
                    sum_dy, sum_dy_xmu = _all_reduce_sums(sum_dy, sum_dy_xmu, group)
                counts = (count / inv_k).round().to(torch.int32).reshape(1)
                grad_x = cuda_kernels.backward_elemt(grad_y, x, mean, invstd, gamma, sum_dy,
                                                     sum_dy_xmu, counts)
        elif group is None and need_x and x.dtype == mean.dtype and fused.applies(mean) is not None:
            grad_x, grad_w, grad_b = fused.ops().window_norm_backward(grad_y, x, gamma, mean, invstd,
                                                                       inv_k, ctx.eps)
        elif group is None and need_x and x.dtype == mean.dtype:
            # CPU, full precision: dx = (1/k)·BN's backward at the window statistics
            # + (1 − 1/k)·γ r g (BN's kernel, whose count is this batch's; then one fused pass)
            # (contiguous: the channels-last CPU kernel misreads a stride-0 weight, torch 2.13)
            scale = inv_k.expand(mean.shape).contiguous() if gamma is None else gamma * inv_k
            grad_x, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, scale, None, None, mean, invstd, True, ctx.eps, [True, True, True])
            scaled = invstd if gamma is None else gamma * invstd
            rest = torch.addcmul(scaled, scaled, inv_k, value=-1.0)  # (1 − 1/k)·γ r
            grad_x.addcmul_(grad_y, rest.view(1, -1, 1, 1))
        else:
            # CPU: one fused reduction (Σg, Σg·x̂), then dx = a·g + b·x + c in two fused passes
            ones = gamma if gamma is not None else torch.ones_like(mean)
            _, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                grad_y, x, ones, None, None, mean, invstd, True, ctx.eps, [False, True, True])
            grad_w, grad_b = sum_dy_xhat, sum_dy  # this process's share, as in SyncBN
            grad_x = None
            if need_x:
                if group is not None:
                    sum_dy, sum_dy_xhat = _all_reduce_sums(sum_dy, sum_dy_xhat, group)
                a = ones * invstd
                scale = a * inv_k / count
                b = -scale * invstd * sum_dy_xhat
                c = -scale * (sum_dy - mean * invstd * sum_dy_xhat)
                shape = (1, -1, 1, 1)
                grad_x = torch.addcmul(c.view(shape), x, b.view(shape))
                grad_x.addcmul_(grad_y, a.view(shape))
                grad_x = grad_x.to(x.dtype).contiguous(memory_format=_memory_format(x))
        # a gradient only for inputs that are tensors needing one, in their own dtype
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(weight.dtype) if need_b else None
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def _differentiable_backward(ctx, grad_y: Tensor):
    """The backward's formula in differentiable operations of ``x, γ`` and ``grad_y`` (see the module
    docstring), for a double backward; in the statistics' precision, like the fused paths."""
    x, weight, mean, invstd, inv_k = ctx.saved_tensors
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    need_w = need_w and weight is not None
    need_b = need_b and weight is not None
    count, group = ctx.count, ctx.group
    if x.numel() == 0 and group is None:  # nothing depends on an empty batch
        grad_w = mean.new_zeros(mean.shape).to(weight.dtype) if need_w else None
        grad_b = mean.new_zeros(mean.shape).to(weight.dtype) if need_b else None
        return (torch.empty_like(x) if need_x else None, grad_w, grad_b,
                None, None, None, None, None, None, None)
    shape, dims = (1, -1, 1, 1), (0, 2, 3)
    u = x.to(mean.dtype) - mean.view(shape)  # x − μ̄ (μ̄ a constant)
    g = grad_y.to(mean.dtype)
    local = torch.cat([u.sum(dims), u.square().sum(dims), g.sum(dims), (g * u).sum(dims)])
    sums = local
    if group is not None and need_x:  # (an empty x takes part too: its zero sums are in the graph)
        sums = _AllReduceSum.apply(local, group)
    sum_u, sum_uu, sum_dy, sum_dy_u = sums.view(4, -1).unbind(0)
    # zero, with the derivatives of the moments about μ̄ (only the current batch depends on x)
    d_mean = sum_u / count
    d_mean = d_mean - d_mean.detach()
    d_second = sum_uu / count
    d_second = d_second - d_second.detach()
    shift = d_mean * inv_k                                # μ̄(x) − μ̄
    d_var = (d_second - d_mean * shift) * inv_k           # σ̄²(x) − σ̄²
    r = invstd * torch.rsqrt(1.0 + d_var * invstd.square())  # (σ̄²(x) + ε)^{-1/2}, exactly r in value
    xhat = (u - shift.view(shape)) * r.view(shape)
    sum_dy_xhat = r * (sum_dy_u - shift * sum_dy)
    grad_x = None
    if need_x:
        a = r if weight is None else weight.to(mean.dtype) * r
        scale = inv_k / count
        inner = g - scale * (sum_dy.view(shape) + xhat * sum_dy_xhat.view(shape))
        grad_x = (a.view(shape) * inner).to(x.dtype).contiguous(memory_format=_memory_format(x))
    # γ and β: this process's share, as in the fused paths
    _, _, local_dy, local_dy_u = local.view(4, -1).unbind(0)
    grad_w = (r * (local_dy_u - shift * local_dy)).to(weight.dtype) if need_w else None
    grad_b = local_dy.to(weight.dtype) if need_b else None
    return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


class _AllReduceSum(torch.autograd.Function):
    """A sum over the processes of ``group`` whose backward is the same all-reduce (differentiable to
    any order): the gradient of every process's loss reaches every process's input."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        out = t.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, torch.distributed.ReduceOp.SUM, group)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _AllReduceSum.apply(grad, ctx.group), None


def _all_reduce_sums(first: Tensor, second: Tensor, group) -> Tuple[Tensor, Tensor]:
    """Sum two per-channel tensors over the processes of ``group`` with one all-reduce."""
    combined = torch.cat([first, second])
    torch.distributed.all_reduce(combined, torch.distributed.ReduceOp.SUM, group)
    return combined[:first.numel()], combined[first.numel():]


def _memory_format(x: Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def window_batch_norm(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], past_mean: Tensor,
                      past_var: Tensor, past_valid: Tensor,
                      eps: float) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Eqs. 9-12 for ``x`` and the compensated past: ``(y, μ_t, var_t, μ̄, σ̄², k)``.

    Only ``y`` is differentiable; the statistics are returned for the history and running stats.
    """
    with torch.no_grad():
        batch_mean, batch_var = batch_moments(x)
        mean, var, k = window_moments(batch_mean, batch_var, past_mean, past_var, past_valid)
    y = WindowBatchNormFunction.apply(x, weight, bias, mean, var, k.reciprocal(), eps)
    return y, batch_mean, batch_var, mean, var, k


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
