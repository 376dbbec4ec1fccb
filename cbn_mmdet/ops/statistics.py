"""Pure tensor maths of Cross-Iteration Batch Normalization (no module state).

Notation follows the paper (Yao et al., CVPR 2021): a CBN layer ``l`` normalises the output ``x`` of a
convolution with weights ``θ^l`` applied to ``y^{l-1}``. Per channel ``j`` and iteration ``t``

* ``μ_t = mean(x)``, ``ν_t = mean(x²)``  (Eqs. 2-3) and the biased variance ``var_t = ν_t − μ_t²``;
* a past iteration's statistics are moved to the current weights by a first-order Taylor step
  (Eqs. 7-8), clamped so that ``ν ≥ μ²`` (Eq. 10), averaged over the window (Eqs. 9-11) and used to
  normalise the current batch with ``eps`` inside the square root (Eq. 12).

Numerically we never form ``ν − μ²`` from large ``ν`` and ``μ²``: every quantity is kept centred. This is
the same function as the paper's, rewritten with exact identities:

* Eq. 8 minus the square of Eq. 7 gives ``ν̃ − μ̃² = var + ∂var/∂θ·Δθ − (∂μ/∂θ·Δθ)²`` with
  ``∂var/∂θ = ∂ν/∂θ − 2μ ∂μ/∂θ``; so the history keeps ``∂var/∂θ`` instead of ``∂ν/∂θ``.
* Eq. 10: ``max(ν̃, μ̃²) = μ̃² + max(ν̃ − μ̃², 0)``.
* Eqs. 9-11: ``ν̄ − μ̄² = mean_τ max(var̃_τ, 0) + mean_τ (μ̃_τ − μ̄)²`` (within plus between iterations).

The first-order terms are evaluated without storing past weights: ``∂μ/∂θ·(θ_t − θ_old) =
<∂μ/∂θ, θ_t> − <∂μ/∂θ, θ_old>``, and the second inner product (a per-channel scalar, the "reference")
is stored when the iteration is recorded.
"""
from typing import NamedTuple, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import fused

__all__ = [
    'batch_moments', 'patch_mean', 'variance_weight_gradient', 'statistic_gradients_autograd',
    'conv_statistic_gradients',
    'linear_term_mean', 'linear_term_var', 'compensate_history', 'compensate_window',
    'window_moments', 'window_statistics', 'merge_moments', 'pool_moments', 'all_finite',
    'finite_flag', 'running_factor', 'update_running_', 'DeferredCentring',
]

_REDUCE_DIMS = (0, 2, 3)


def batch_moments(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean ``μ`` (Eq. 2) and biased variance ``ν − μ²`` (Eq. 3) of an NCHW batch.

    Computed in float32 (or float64 for float64 input) whatever the input precision. On CPU this is
    BN's own statistics kernel (``batch_norm_update_stats``, a one-pass Welford reduction per channel,
    about 3× faster there than the generic ``var_mean`` reduction over three dimensions). An empty
    batch gives zeros.
    """
    acc = x if x.dtype in (torch.float32, torch.float64) else x.float()
    if acc.numel() == 0:  # no values: zeros, which callers weigh by the batch's count of 0
        zeros = acc.new_zeros(acc.shape[1])
        return zeros, zeros.clone()
    if acc.device.type == 'cpu':
        mean, var = torch.batch_norm_update_stats(acc, None, None, 0.0)
        return mean, var
    var, mean = torch.var_mean(acc, dim=_REDUCE_DIMS, correction=0)
    return mean, var


def _acc_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def patch_mean(conv_input: Tensor, kernel_size: Sequence[int], output_size: Sequence[int],
               stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """``∂μ/∂θ`` of a convolution's output mean: the mean input patch (Appendix B, Eq. 15).

    ``∂μ_j/∂θ_{j,p,η} = 1/m Σ_i y_{i+offset(η),p}`` does not depend on the output channel ``j`` (beyond
    the group ``j`` belongs to), so it is returned once per *input* channel, shape ``(C_in, kh, kw)``:
    O(C_in·K) numbers. The mean is linear, so the batch is summed first; then kernel offset ``η`` sees
    the strided lattice of rows (columns) ``η·d + i·s``: ``kh`` strided row sums and ``kw`` strided
    column sums, O(K·C_in·H·W) additions, far below the conv itself.
    """
    out_h, out_w = output_size
    count = conv_input.shape[0] * out_h * out_w
    dtype = _acc_dtype(conv_input)
    summed = conv_input.to(dtype).sum(dim=0)                                 # (C_in, H, W)
    kh, kw = kernel_size
    (sh, sw), (ph, pw), (dh, dw) = stride, padding, dilation
    if (kh, kw) == (1, 1) and (sh, sw) == (1, 1) and (ph, pw) == (0, 0):
        return (summed.sum(dim=(1, 2)) / count).reshape(-1, 1, 1)
    if ph or pw:
        summed = torch.nn.functional.pad(summed, (pw, pw, ph, ph))
    rows = torch.stack([summed[:, a * dh:a * dh + (out_h - 1) * sh + 1:sh].sum(dim=1)
                        for a in range(kh)], dim=1)                          # (C_in, kh, W)
    patch = torch.stack([rows[:, :, b * dw:b * dw + (out_w - 1) * sw + 1:sw].sum(dim=2)
                         for b in range(kw)], dim=2)                         # (C_in, kh, kw)
    return patch / count


class DeferredCentring(NamedTuple):
    """``∂var/∂θ = scale · product − 2 μ ⊗ patch`` not yet formed (:func:`variance_weight_gradient`
    with ``defer_centring``), for a consumer that forms it in a pass of its own."""
    product: Tensor   # Σ_i x_i y_i: the weight-gradient convolution of the conv output itself
    scale: float      # 2/m
    mean: Tensor      # (C_out,) μ
    patch: Tensor     # (C_in, kh, kw) the mean input patch of the same positions

    def finished(self, groups: int) -> Tensor:
        centring = self.mean.to(self.product.dtype).view(-1, 1, 1, 1) * patch_mean_as_weight(
            self.patch.to(self.product.dtype), self.product.shape[0], groups)
        return self.product.mul_(self.scale).sub_(centring, alpha=2.0)


def variance_weight_gradient(conv_input: Tensor, x: Tensor, batch_mean: Tensor, patch: Tensor,
                             weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int, subsample: int = 1,
                             centred: bool = False, operand_dtype: Optional[torch.dtype] = None,
                             defer_centring: bool = False) -> Union[Tensor, DeferredCentring]:
    """``∂var/∂θ = 2/m Σ_i (x_i − μ) y_i`` for the conv ``x = θ * y``: one weight-gradient convolution.

    This is Appendix B's ``∂ν/∂θ`` minus ``2μ ∂μ/∂θ`` (see the module docstring); it has the shape of
    ``θ``, O(C_out·C_in·K). By default it is evaluated as ``2/m Σ_i x_i y_i − 2μ ⊗ patch``: the
    weight-gradient convolution takes the conv output itself as its output gradient (no activation-
    sized centring pass), and the centring is a rank-one, weight-sized correction with the mean input
    patch ``patch`` (from :func:`patch_mean` over the same positions). ``centred=True`` feeds
    ``x − μ`` instead (one elementwise pass): then a product whose operands are rounded (TF32 on
    CUDA, at about 3 decimal digits) rounds the small centred quantity, not the large uncentred one.

    ``subsample = r > 1`` is the approximate mode: the sum runs over every ``r``-th output row and
    column only (the same conv with stride ``r·s``), ``r²`` times fewer multiply-adds; ``patch`` must
    then be the patch mean of those positions, which makes the estimate exactly centred on them.

    ``operand_dtype=torch.bfloat16`` runs the weight-gradient convolution on bfloat16 operands (the
    kernels accumulate in float32), always centred: the rounding then applies to ``x − μ`` and ``y``,
    relative 2⁻⁹, not to a large uncentred sum that the centring would cancel. (The input covariance
    of an expanding 1×1 conv stays float32: few multiply-adds there.)

    ``defer_centring``: return the uncentred product and the centring as a :class:`DeferredCentring`
    (the fused record forms ``∂var/∂θ`` while it copies it, saving three weight-sized passes).
    """
    dtype = _acc_dtype(x)
    if subsample == 1 and _input_covariance_is_cheaper(conv_input, x, weight, padding, groups):
        return _variance_weight_gradient_1x1(conv_input, x, patch, weight, stride, centred)
    if subsample > 1:
        x = x[:, :, ::subsample, ::subsample]
        stride = [s * subsample for s in stride]
    count = x.shape[0] * x.shape[2] * x.shape[3]
    w = weight.to(dtype)
    grad_out = x.to(dtype)
    centred = centred or operand_dtype is not None
    if centred:
        grad_out = grad_out - batch_mean.to(dtype).view(1, -1, 1, 1)
    operands = dtype if operand_dtype is None else operand_dtype
    if _matmul_is_faster(x, weight, padding, groups):
        second = weight_gradient_1x1(grad_out.to(operands), conv_input, stride)
    else:
        second = weight_gradient(grad_out.to(operands), conv_input.to(operands), w.to(operands),
                                 stride, padding, dilation, groups)
    second = second.to(dtype)
    if centred:
        return second.mul_(2.0 / count)
    deferred = DeferredCentring(second, 2.0 / count, batch_mean, patch)
    return deferred if defer_centring else deferred.finished(groups)


def weight_gradient(grad_out: Tensor, conv_input: Tensor, weight: Tensor, stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int], groups: int) -> Tensor:
    """``Σ_i grad_out_i ⊗ patch_i(conv_input)``: the conv's weight gradient for ``grad_out``."""
    return torch.ops.aten.convolution_backward(
        grad_out, conv_input, weight, None, list(stride), list(padding), list(dilation), False,
        [0, 0], groups, [False, True, False])[1]


def weight_gradient_1x1(grad_out: Tensor, conv_input: Tensor, stride: Sequence[int]) -> Tensor:
    """:func:`weight_gradient` of an unpadded, ungrouped 1×1 conv as one batched matrix product
    (the sum over the batch inside it), on operands of ``grad_out``'s dtype."""
    y = _strided_positions(conv_input, grad_out.shape[2:], stride).to(grad_out.dtype)
    n, c_out, c_in = grad_out.shape[0], grad_out.shape[1], y.shape[1]
    product = grad_out.new_empty((c_out, c_in))
    torch.addbmm(product, grad_out.reshape(n, c_out, -1), y.reshape(n, c_in, -1).transpose(1, 2),
                 beta=0, out=product)
    return product.view(c_out, c_in, 1, 1)


def _strided_positions(conv_input: Tensor, output_size: Sequence[int],
                       stride: Sequence[int]) -> Tensor:
    """The input values an unpadded 1×1 conv with ``stride`` reads."""
    (sh, sw), (out_h, out_w) = stride, output_size
    if (sh, sw) == (1, 1):
        return conv_input
    return conv_input[:, :, :(out_h - 1) * sh + 1:sh, :(out_w - 1) * sw + 1:sw]


def _matmul_is_faster(x: Tensor, weight: Tensor, padding: Sequence[int], groups: int) -> bool:
    """Whether a CPU 1×1 conv's weight-gradient product is faster as a matrix product: oneDNN's
    weight-gradient kernel is slow when the sum over positions is short."""
    return (x.device.type == 'cpu' and weight.shape[2:] == (1, 1) and not any(padding)
            and groups == 1 and x.shape[0] * x.shape[2] * x.shape[3] <= MATMUL_MAX_POSITIONS)


def gram(flat: Tensor) -> Tensor:
    """``Σ_n Y_n Y_nᵀ`` of ``(N, C, P)`` samples: a ``C × C`` matrix."""
    return torch.bmm(flat, flat.transpose(1, 2)).sum(0)


def _input_covariance_is_cheaper(conv_input: Tensor, x: Tensor, weight: Tensor,
                                 padding: Sequence[int], groups: int) -> bool:
    """Whether ``2 θ Cov(y)`` (1×1 conv) costs fewer multiply-adds than the weight-gradient conv."""
    if weight.shape[2:] != (1, 1) or any(padding) or groups != 1:
        return False
    c_out, c_in = weight.shape[:2]
    positions = x.shape[0] * x.shape[2] * x.shape[3]
    # Gram matrix C_in²·m plus θ·Cov C_out·C_in², against C_out·C_in·m (with a margin for the copy)
    return c_in * (positions + c_out) < 0.7 * c_out * positions


def _variance_weight_gradient_1x1(conv_input: Tensor, x: Tensor, patch: Tensor, weight: Tensor,
                                  stride: Sequence[int], centred: bool = False) -> Tensor:
    """``∂var/∂θ = 2 θ Cov(y)`` for a 1×1 conv ``x = θ y + b``: ``2/m Σ (x − μ) yᵀ`` with ``x − μ =
    θ (y − ȳ)``. ``Cov(y)`` is a ``C_in × C_in`` Gram matrix, cheaper than the weight-gradient conv
    when ``C_in`` is small against ``C_out`` (a bottleneck's expanding 1×1 conv: 4× fewer).
    """
    dtype = _acc_dtype(x)
    y = _strided_positions(conv_input.to(dtype), x.shape[2:], stride)
    n, c_in = y.shape[:2]
    flat = y.reshape(n, c_in, -1)
    positions = n * flat.shape[2]
    mean = patch.to(dtype).reshape(c_in, 1)
    if centred:
        cov = gram(flat - mean).div_(positions)
    else:
        cov = gram(flat).div_(positions).sub_(mean @ mean.T)
    w = weight.to(dtype).reshape(weight.shape[0], c_in)
    return (w @ cov).mul_(2.0).reshape(weight.shape)


def subsampled_output_size(output_size: Sequence[int], subsample: int) -> Tuple[int, int]:
    """Size of ``x[:, :, ::r, ::r]`` for an output of ``output_size``."""
    return tuple(-(-n // subsample) for n in output_size)


def statistic_gradients_autograd(conv_input: Tensor, weight: Tensor, bias: Optional[Tensor],
                                 stride: Sequence[int], padding: Sequence[int],
                                 dilation: Sequence[int], groups: int) -> Tuple[Tensor, Tensor]:
    """Reference: ``∂μ/∂θ`` and ``∂ν/∂θ`` in the weight's layout by two autograd passes.

    This is what the authors' code did. ``∂μ_j/∂θ`` is non-zero only in row ``j`` (Eq. 15), and so is
    ``∂ν_j/∂θ``, so the gradient of ``Σ_j μ_j`` gives every row exactly. Returns
    ``(dmean_dweight, dsecond_moment_dweight)``, both shaped like ``weight``.
    """
    dtype = _acc_dtype(conv_input)
    with torch.enable_grad():
        w = weight.detach().to(dtype).requires_grad_(True)
        b = None if bias is None else bias.detach().to(dtype)
        x = torch.nn.functional.conv2d(conv_input.detach().to(dtype), w, b, tuple(stride),
                                       tuple(padding), tuple(dilation), groups)
        mean = x.mean(dim=_REDUCE_DIMS)
        second = (x * x).mean(dim=_REDUCE_DIMS)
        d_mean, = torch.autograd.grad(mean.sum(), w, retain_graph=True)
        d_second, = torch.autograd.grad(second.sum(), w)
    return d_mean, d_second


def conv_statistic_gradients(conv_input: Tensor, x: Tensor, batch_mean: Tensor, weight: Tensor,
                             bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                             dilation: Sequence[int], groups: int, method: str = 'closed_form',
                             subsample: int = 1, operand_dtype: Optional[torch.dtype] = None,
                             defer_centring: bool = False) -> Tuple[Tensor, Tensor]:
    """``(∂μ/∂θ as a (C_in, kh, kw) patch mean, ∂var/∂θ)`` of the batch ``x = conv(conv_input)``.

    ``method``: ``'closed_form'`` (Appendix B), ``'subsampled'`` (∂var/∂θ from every
    ``subsample``-th output row and column) or ``'autograd'`` (the reference). ``operand_dtype``,
    ``defer_centring`` (∂var/∂θ may then be a :class:`DeferredCentring`): see
    :func:`variance_weight_gradient`.
    """
    if method == 'autograd':
        d_mean, d_second = statistic_gradients_autograd(conv_input, weight, bias, stride, padding,
                                                        dilation, groups)
        c_out, c_in_g, kh, kw = d_mean.shape
        patch = d_mean.reshape(groups, c_out // groups, c_in_g, kh, kw)[:, 0].reshape(-1, kh, kw)
        return patch, d_second - 2.0 * batch_mean.to(d_mean.dtype).view(-1, 1, 1, 1) * d_mean
    kh, kw = weight.shape[2:]
    # (in float32 whatever operand_dtype: faster than the weight-gradient kernels at these sizes)
    if (method == 'closed_form' and not x.is_cuda and kh * kw > 1
            and (conv_input.shape[0] * conv_input.shape[1] * kh * kw * x.shape[2] * x.shape[3]
                 <= UNFOLD_MAX_ELEMENTS or x.shape[0] * x.shape[2] * x.shape[3]
                 <= UNFOLD_MAX_POSITIONS)):
        return _statistic_gradients_by_unfold(conv_input, x, batch_mean, weight, stride, padding,
                                              dilation, groups)
    patch = patch_mean(conv_input, (kh, kw), x.shape[2:], stride, padding, dilation)
    sub = subsample if method == 'subsampled' else 1
    sub_patch = patch if sub == 1 else patch_mean(
        conv_input, (kh, kw), subsampled_output_size(x.shape[2:], sub), [s * sub for s in stride],
        padding, dilation)
    # centred on CUDA, where cuDNN may round the product's operands to TF32 (allowed by default)
    var_grad = variance_weight_gradient(conv_input, x, batch_mean, sub_patch, weight, stride, padding,
                                        dilation, groups, sub, centred=x.is_cuda,
                                        operand_dtype=operand_dtype, defer_centring=defer_centring)
    return patch, var_grad


#: Input patches (N·C_in·K·positions) up to which the CPU takes both gradients from one unfolded
#: copy of the input: for such small layers the weight-gradient kernel's fixed cost dominates
#: (measured: 2.5× faster at 18k, even at 64k, slower above).
UNFOLD_MAX_ELEMENTS = 1 << 16
#: Output positions (N·H·W) up to which the CPU takes that way whatever the channels: the
#: weight-gradient kernel is slow when the sum over positions is short (measured with one thread,
#: 2 × 512 → 512 3×3 at 5×5: 20 ms against 4.8 ms unfolded; at 10×10 the two are even).
UNFOLD_MAX_POSITIONS = 64
#: Output positions (N·H·W) up to which a CPU 1×1 conv's ∂var/∂θ product is a batched matrix
#: product instead of the weight-gradient convolution (measured, 2 threads: 2048 → 1024 stride 2
#: at 5×5 outputs 9.0 ms against 1.3 ms, 512 → 2048 at 5×5 2.2 against 0.8 ms; even at 800–3200
#: positions, oneDNN faster for some shapes above).
MATMUL_MAX_POSITIONS = 1024


def _statistic_gradients_by_unfold(conv_input: Tensor, x: Tensor, batch_mean: Tensor,
                                   weight: Tensor, stride: Sequence[int], padding: Sequence[int],
                                   dilation: Sequence[int], groups: int) -> Tuple[Tensor, Tensor]:
    """:func:`conv_statistic_gradients` of a small conv from its unfolded input ``cols``: the patch
    mean is the mean column, ``∂var/∂θ = 2/m Σ (x − μ) colsᵀ`` per group (the output centred: it is
    ``kh·kw·C_in/C_out`` times smaller than ``cols``)."""
    dtype = _acc_dtype(x)
    n, c_out = x.shape[:2]
    kh, kw = weight.shape[2:]
    ops = fused.applies(x)
    if ops is not None and conv_input.dtype == x.dtype == batch_mean.dtype:
        # the same in one pass over the columns and one product (what the one-call step runs)
        patch, var_grad = ops.unfold_gradients(conv_input, x, batch_mean, kh, kw, list(stride),
                                               list(padding), list(dilation), groups)
        return patch, var_grad.view(weight.shape)
    cols = torch.nn.functional.unfold(conv_input if conv_input.dtype == dtype else
                                      conv_input.to(dtype), (kh, kw), dilation=tuple(dilation),
                                      padding=tuple(padding), stride=tuple(stride))
    count = n * cols.shape[2]
    mean_column = cols.mean(dim=(0, 2), keepdim=True)  # (1, C_in·K, 1)
    patch = mean_column.view(-1, kh, kw)
    mean = batch_mean if batch_mean.dtype == dtype else batch_mean.to(dtype)
    if groups == 1:  # the sum over the batch inside one product
        centred = x.to(dtype).reshape(n, c_out, -1) - mean.view(1, -1, 1)
        var_grad = torch.empty((c_out, cols.shape[1]), dtype=dtype, device=x.device)
        torch.addbmm(var_grad, centred, cols.transpose(1, 2), beta=0, alpha=2.0 / count,
                     out=var_grad)
        return patch, var_grad.view(weight.shape)
    centred = x.to(dtype).reshape(n, groups, c_out // groups, -1) - mean.view(1, groups, -1, 1)
    cols = cols.reshape(n, groups, cols.shape[1] // groups, -1)
    var_grad = torch.matmul(centred, cols.transpose(2, 3)).sum(0).mul_(2.0 / count)
    return patch, var_grad.reshape(weight.shape)


def _weight_groups(weight: Tensor, groups: int) -> Tensor:
    """``θ`` as ``(G, C_out/G, C_in/G·K)``."""
    c_out = weight.shape[0]
    return weight.reshape(groups, c_out // groups, -1)


def linear_term_mean(patch_means: Tensor, weight: Tensor, bias: Optional[Tensor],
                     groups: int) -> Tensor:
    """``<∂μ/∂θ, θ> + b`` per channel for a stack of patch means ``(T, C_in, kh, kw)`` → ``(T, C_out)``.

    The mean of a conv output is linear in ``(θ, b)``, so this is the μ that the recorded inputs would
    give under ``(θ, b)``; differences of it are the first-order terms of Eq. 7.
    """
    t, c_out = patch_means.shape[0], weight.shape[0]
    w = weight if weight.dtype == patch_means.dtype else weight.to(patch_means.dtype)
    if groups == 1:  # one matrix product (an einsum costs a dozen small view/permute calls)
        flat = patch_means.reshape(t, -1)
        w = w.reshape(c_out, -1).t()
        if bias is None:
            return torch.mm(flat, w)
        return torch.addmm(bias if bias.dtype == flat.dtype else bias.to(flat.dtype), flat, w)
    p = patch_means.reshape(t, groups, -1)                                  # (T, G, D)
    lin = torch.einsum('tgd,gcd->tgc', p, _weight_groups(w, groups)).reshape(t, -1)
    return lin if bias is None else lin + bias.to(lin.dtype)


def linear_term_var(var_grads: Tensor, weight: Tensor) -> Tensor:
    """``<∂var/∂θ, θ>`` per channel for a stack ``(T, C_out, C_in/G, kh, kw)`` → ``(T, C_out)``."""
    t, c_out = var_grads.shape[:2]
    # in the weight's precision (at least float32): gradients stored in bfloat16 are widened, never
    # the weights narrowed (the difference of two such products is the small Taylor term)
    dtype = torch.promote_types(torch.promote_types(var_grads.dtype, weight.dtype), torch.float32)
    g = var_grads if var_grads.dtype == dtype else var_grads.to(dtype)
    w = weight if weight.dtype == dtype else weight.to(dtype)
    # per channel, T dot products of length C_in·K (each row's sum does not depend on T, so a
    # reference term recorded alone equals the same entry's term among T)
    return torch.linalg.vecdot(g.reshape(t, c_out, -1), w.reshape(c_out, -1))


def compensate_history(mean: Tensor, var: Tensor, mean_ref: Tensor, var_ref: Tensor,
                       patch_means: Tensor, var_grads: Tensor, compensable: Tensor, weight: Tensor,
                       bias: Optional[Tensor], groups: int,
                       clamp: bool = True) -> Tuple[Tensor, Tensor]:
    """Eqs. 7, 8 and 10 for all recorded iterations at once.

    Args:
        mean, var: ``(T, C)`` statistics recorded at ``θ_{t−τ}``.
        mean_ref, var_ref: ``(T, C)`` the linear terms evaluated at ``θ_{t−τ}`` when recorded.
        patch_means: ``(T, C_in, kh, kw)`` ``∂μ/∂θ`` per recorded iteration.
        var_grads: ``(T, C, C_in/G, kh, kw)`` ``∂var/∂θ`` per recorded iteration.
        compensable: ``(T,)`` 1 where the entry has gradients, 0 where it must be used as recorded.
        weight, bias: the current ``θ_t`` (and conv bias, if trainable).
        clamp: apply Eq. 10; ``False`` returns ``ν̃ − μ̃²`` as is, for moments that are pooled with
            other processes' before the clamp (:func:`pool_moments`).

    Returns:
        ``(μ̃, var̃)`` at the current weights, ``var̃ = max(ν̃ − μ̃², 0)`` (Eq. 10), shape ``(T, C)``.
    """
    mask = compensable.to(mean.dtype).unsqueeze(1)
    d_mean = linear_term_mean(patch_means, weight, bias, groups).sub_(mean_ref).mul_(mask)
    d_var = linear_term_var(var_grads, weight).sub_(var_ref).mul_(mask)
    mean_t = mean + d_mean
    var_t = torch.addcmul(var + d_var, d_mean, d_mean, value=-1.0)
    return mean_t, var_t.clamp_min_(0.0) if clamp else var_t


def compensate_window(mean: Tensor, var: Tensor, mean_ref: Tensor, var_ref: Tensor,
                      patches: Tensor, var_grads: Tensor, weight_rows: Tensor, weight_vectors: Tensor,
                      bias: Optional[Tensor], compensable: Tensor, groups: int,
                      clamp: bool = True) -> Tuple[Tensor, Tensor]:
    """:func:`compensate_history` on the channel-major layout the layer keeps (one matrix product
    for the means, one batched product for the variances, no weight-sized temporary).

    Args:
        mean, var, mean_ref, var_ref: ``(C, T)`` (``var`` also as ``(C, 1, T)``); an entry that is
            not compensable holds zero references and zero gradients, so it comes out as recorded
            without a mask.
        patches: ``∂μ/∂θ`` as ``(C_in·K, T)`` (``groups == 1``) or ``(G, C_in/G·K, T)``.
        var_grads: ``∂var/∂θ`` as ``(C, T, C_in/G·K)``.
        weight_rows: ``θ_t`` as ``(C, C_in/G·K)`` (``groups == 1``) or ``(G, C/G, C_in/G·K)``.
        weight_vectors: ``θ_t`` as ``(C, 1, C_in/G·K)``.
        bias: the conv's current trainable bias or None; ``compensable``: ``(T,)`` 0/1, the entries
            whose reference includes the bias.

    Returns ``(μ̃, var̃)``, ``(C, T)``.
    """
    c, t = mean.shape
    if groups == 1:
        mean_t = torch.addmm(mean, weight_rows, patches)
    else:
        mean_t = torch.baddbmm(mean.view(groups, c // groups, t), weight_rows, patches).view(c, t)
    mean_t.sub_(mean_ref)
    if bias is not None:
        mean_t.addr_(bias, compensable)
    # θ_c as a row against the transposed gradients: per channel a (1 × D)(D × T) product, about
    # memory bandwidth on CPU (the (T × D)(D × 1) orientation is several times slower)
    var_t = torch.baddbmm(var if var.dim() == 3 else var.unsqueeze(1), weight_vectors,
                          var_grads.transpose(1, 2)).view(c, t).sub_(var_ref)
    shift = mean_t - mean
    var_t.addcmul_(shift, shift, value=-1.0)
    return mean_t, var_t.clamp_min_(0.0) if clamp else var_t


def finite_flag(t: Tensor) -> Tensor:
    """0-d bool: whether every value of ``t`` is finite (one sum; its sum is NaN or ±inf when any
    value is, or when finite values overflow it)."""
    total = t.sum()
    return (total - total) == 0


def running_factor(momentum: Optional[float], num_batches_tracked: Tensor,
                   dtype: torch.dtype) -> Union[float, Tensor]:
    """BN's weight of a new batch in the running statistics: ``momentum``, or with ``None`` the
    cumulative average's ``1 / batches`` (a tensor: no host sync; 1 before any batch)."""
    if momentum is not None:
        return momentum
    return num_batches_tracked.clamp_min(1).to(dtype).reciprocal()


def update_running_(running: Tuple[Tensor, Tensor], new: Tuple[Tensor, Tensor], finite: Tensor,
                    factor: Union[float, Tensor]) -> None:
    """Move the running mean and variance towards ``new`` by ``factor``, in place; when ``finite``
    is false each moves towards itself, so non-finite statistics never enter them."""
    for r, n in zip(running, new):
        r.lerp_(torch.where(finite, n if n.dtype == r.dtype else n.to(r.dtype), r), factor)


def all_finite(*tensors: Tensor) -> Tensor:
    """0-d bool: whether every value is finite, from one sum per tensor (a sum is NaN or ±inf when any
    term is; finite values whose sum overflows count as non-finite too)."""
    total = None
    for t in tensors:
        part = t.sum(dtype=torch.float64 if t.dtype == torch.float64 else torch.float32)
        total = part if total is None else total + part
    return (total - total) == 0  # two operations; isfinite is four


def window_moments(batch_mean: Tensor, batch_var: Tensor, past_mean: Tensor, past_var: Tensor,
                   past_valid: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Eqs. 9-11: window mean ``μ̄`` and variance ``σ̄² = ν̄ − μ̄²`` from the current batch and the past.

    Args:
        batch_mean, batch_var: ``(C,)`` current iteration (differentiable).
        past_mean, past_var: ``(T, C)`` compensated past iterations, ``past_var ≥ 0`` (Eq. 10 applied).
        past_valid: ``(T,)`` 1 for entries inside the window, 0 for empty or excluded ones.

    Every iteration in the window weighs ``1/k`` (Eq. 9), ``k = 1 + Σ past_valid``. Returns
    ``(μ̄, σ̄², k)``.
    """
    valid = past_valid if past_valid.dtype == batch_mean.dtype else past_valid.to(batch_mean.dtype)
    k = valid.sum() + 1.0
    mean = torch.addmv(batch_mean, past_mean.t(), valid) / k
    # within-iteration variance plus the spread of the iterations' means around μ̄ (centred)
    spread = past_var + (past_mean - mean).square()
    var = (torch.addmv(batch_var, spread.t(), valid) + (batch_mean - mean).square()) / k
    return mean, var, k


def window_statistics(batch_mean: Tensor, batch_var: Tensor, past_mean: Tensor, past_var: Tensor,
                      weights: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`window_moments` on channel-major past statistics ``(C, T)``; returns ``(μ̄, σ̄², 1/k)``.

    ``weights``: ``(T,)`` 1 for the entries in the window. Centred like :func:`window_moments`.
    """
    inv_k = weights.sum().add_(1.0).reciprocal_()
    mean = torch.addmv(batch_mean, past_mean, weights).mul_(inv_k)
    spread = past_mean - mean.view(-1, 1)
    spread = torch.addcmul(past_var, spread, spread)
    own = batch_mean - mean
    var = torch.addmv(torch.addcmul(batch_var, own, own), spread, weights).mul_(inv_k)
    return mean, var, inv_k


def merge_moments(count_a: Tensor, mean_a: Tensor, var_a: Tensor, count_b: Tensor, mean_b: Tensor,
                  var_b: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Pool two sets of per-channel moments (Chan et al.): used to merge several calls of one iteration.

    Returns ``(count, mean, var)`` of the union; a zero count on one side returns the other.
    """
    count = count_a + count_b
    share_b = torch.where(count > 0, count_b / count.clamp_min(1e-12), torch.zeros_like(count))
    share_a = 1.0 - share_b
    delta = mean_b - mean_a
    mean = mean_a + share_b * delta
    var = share_a * var_a + share_b * var_b + share_a * share_b * delta * delta
    return count, mean, var


def pool_moments(counts: Tensor, means: Tensor, variances: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Pool per-channel moments over a leading dimension of parts (e.g. processes), centred.

    Args:
        counts: ``(P, R)`` number of values of each part in each of ``R`` rows (0: absent).
        means, variances: ``(P, R, C)`` the parts' means and biased variances (``ν − μ²``).

    Returns ``(count, mean, var)`` of the union per row, shapes ``(R,)``, ``(R, C)``, ``(R, C)``:
    ``var = Σ_p w_p (var_p + (μ_p − μ)²)`` with ``w_p = n_p / n``; a row without values gives zeros.
    The parts are summed in order, so every process pooling the same gathered parts gets the same bits.
    """
    count = counts.sum(0)
    share = torch.where(counts > 0, counts / count.clamp_min(1e-12), 0.0).unsqueeze(-1)
    present = share > 0  # a part without values never contributes, whatever its moments hold
    mean = torch.where(present, share * means, 0.0).sum(0)
    spread = variances + (means - mean).square()
    var = torch.where(present, share * spread, 0.0).sum(0)
    return count, mean, var


def patch_mean_as_weight(patch_mean_: Tensor, out_channels: int, groups: int) -> Tensor:
    """Expand a ``(C_in, kh, kw)`` patch mean to the weight layout ``(C_out, C_in/G, kh, kw)``."""
    c_in, kh, kw = patch_mean_.shape
    per_group = patch_mean_.reshape(groups, 1, c_in // groups, kh, kw)
    return per_group.expand(groups, out_channels // groups, c_in // groups, kh, kw).reshape(
        out_channels, c_in // groups, kh, kw)


def merge_gradients(share_a: Tensor, mean_a: Tensor, patch_a: Tensor, var_grad_a: Tensor,
                    mean_b: Tensor, patch_b: Tensor, var_grad_b: Tensor, pooled_mean: Tensor,
                    groups: int) -> Tuple[Tensor, Tensor]:
    """``∂μ/∂θ`` and ``∂var/∂θ`` of two pooled sets with the same weights (share of a: ``share_a``).

    ``var_pooled = Σ_s w_s ν_s − μ²`` gives ``∂var_pooled/∂θ = Σ_s w_s (∂var_s/∂θ + 2(μ_s − μ) ∂μ_s/∂θ)``.
    """
    share_b = 1.0 - share_a
    c_out = var_grad_a.shape[0]
    shape = (c_out, 1, 1, 1)
    dev_a = (2.0 * (mean_a - pooled_mean)).view(shape) * patch_mean_as_weight(patch_a, c_out, groups)
    dev_b = (2.0 * (mean_b - pooled_mean)).view(shape) * patch_mean_as_weight(patch_b, c_out, groups)
    var_grad = share_a * (var_grad_a + dev_a) + share_b * (var_grad_b + dev_b)
    return share_a * patch_a + share_b * patch_b, var_grad
