"""The pure maths of CBN against independent references (autograd, brute force), in float64."""
import contextlib

import pytest
import torch
import torch.nn.functional as F

from cbn_mmdet.ops.statistics import (batch_moments, compensate_history, linear_term_mean,
                                      linear_term_var, merge_gradients, merge_moments, patch_mean,
                                      patch_mean_as_weight, pool_moments,
                                      statistic_gradients_autograd,
                                      subsampled_output_size,
                                      variance_weight_gradient, window_moments)
from cbn_mmdet.ops.window_norm import window_batch_norm, window_batch_norm_reference
from op_names import OpNames

# (C_in, C_out, kernel, stride, padding, dilation, groups)
CONV_VARIANTS = [
    (4, 6, (3, 3), (1, 1), (1, 1), (1, 1), 1),
    (4, 6, (3, 3), (2, 2), (1, 1), (1, 1), 2),    # ResNet stride-2 3x3, grouped
    (4, 4, (3, 3), (1, 1), (2, 2), (2, 2), 4),    # dilated depthwise
    (3, 5, (1, 1), (2, 2), (0, 0), (1, 1), 1),    # downsample 1x1 stride 2
    (3, 5, (1, 1), (1, 1), (0, 0), (1, 1), 1),    # 1x1 fast path
    (4, 6, (3, 1), (2, 1), (1, 0), (1, 1), 1),    # rectangular kernel, anisotropic stride
    (6, 4, (5, 5), (3, 3), (0, 0), (1, 1), 2),    # floor in the output size
    (3, 4, (7, 7), (2, 2), (3, 3), (1, 1), 1),    # ResNet stem
]


def _conv_case(variant, seed=0, bias=True):
    c_in, c_out, k, s, p, d, g = variant
    gen = torch.Generator().manual_seed(seed)
    y = torch.randn(3, c_in, 13, 11, dtype=torch.float64, generator=gen) + 0.7
    w = torch.randn(c_out, c_in // g, *k, dtype=torch.float64, generator=gen)
    b = torch.randn(c_out, dtype=torch.float64, generator=gen) if bias else None
    return y, w, b, s, p, d, g


def _var_grad(y, x, mean, w, s, p, d, g, subsample=1):
    out_size = subsampled_output_size(x.shape[2:], subsample)
    patch = patch_mean(y, w.shape[2:], out_size, [a * subsample for a in s], p, d)
    return variance_weight_gradient(y, x, mean, patch, w, s, p, d, g, subsample)


@pytest.mark.parametrize('variant', CONV_VARIANTS)
def test_closed_form_gradients_equal_autograd(variant):
    """Appendix B's closed forms equal two autograd passes (the authors' method), float64."""
    y, w, b, s, p, d, g = _conv_case(variant)
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, _ = batch_moments(x)
    d_mean, d_second = statistic_gradients_autograd(y, w, b, s, p, d, g)
    patch = patch_mean(y, w.shape[2:], x.shape[2:], s, p, d)
    torch.testing.assert_close(patch_mean_as_weight(patch, w.shape[0], g), d_mean,
                               rtol=1e-12, atol=1e-12)
    var_grad = _var_grad(y, x, mean, w, s, p, d, g)
    torch.testing.assert_close(var_grad, d_second - 2 * mean.view(-1, 1, 1, 1) * d_mean,
                               rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('subsample', [2, 3])
@pytest.mark.parametrize('variant', CONV_VARIANTS)
def test_subsampled_variance_gradient_is_exact_on_its_positions(variant, subsample):
    """Approximate mode: the exact ∂var/∂θ estimator restricted to every r-th output row and column.

    Reference by autograd: the derivative of mean over those positions of (x − μ)², μ the full-batch
    mean held fixed, is 2/m' Σ' (x − μ) ∂x/∂θ.
    """
    y, w, b, s, p, d, g = _conv_case(variant)
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, _ = batch_moments(x)
    wr = w.clone().requires_grad_(True)
    xr = F.conv2d(y, wr, b, s, p, d, g)[:, :, ::subsample, ::subsample]
    ref, = torch.autograd.grad((xr - mean.view(1, -1, 1, 1)).square().mean(dim=(0, 2, 3)).sum(), wr)
    torch.testing.assert_close(_var_grad(y, x, mean, w, s, p, d, g, subsample), ref,
                               rtol=1e-10, atol=1e-10)


def test_variance_gradient_float32_with_large_mean():
    """The uncentred evaluation stays accurate in float32 when the conv output's mean is 10σ."""
    y, w, b, s, p, d, g = _conv_case(CONV_VARIANTS[0])
    b = b * 0 + 10.0 * F.conv2d(y, w, None, s, p, d, g).std()
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, _ = batch_moments(x)
    exact = _var_grad(y, x, mean, w, s, p, d, g)
    x32 = x.float()
    approx = _var_grad(y.float(), x32, batch_moments(x32)[0], w.float(), s, p, d, g)
    assert approx.dtype == torch.float32
    torch.testing.assert_close(approx.double(), exact, rtol=0, atol=1e-4 * exact.abs().max().item())


def test_statistic_gradients_against_full_jacobian():
    """dμ/dθ is block diagonal (Eq. 15): check every entry of the full Jacobian, not only rows."""
    y, w, b, s, p, d, g = _conv_case(CONV_VARIANTS[1])

    def stats(weight):
        x = F.conv2d(y, weight, b, s, p, d, g)
        return torch.cat([x.mean((0, 2, 3)), x.var((0, 2, 3), correction=0)])

    jac = torch.autograd.functional.jacobian(stats, w)  # (2C, C, Cin/g, kh, kw)
    c = w.shape[0]
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, _ = batch_moments(x)
    patch_w = patch_mean_as_weight(patch_mean(y, w.shape[2:], x.shape[2:], s, p, d), c, g)
    var_grad = _var_grad(y, x, mean, w, s, p, d, g)
    expected_mean = torch.zeros_like(jac[:c])
    expected_var = torch.zeros_like(jac[c:])
    for j in range(c):
        expected_mean[j, j] = patch_w[j]
        expected_var[j, j] = var_grad[j]
    torch.testing.assert_close(jac[:c], expected_mean, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(jac[c:], expected_var, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('variant', CONV_VARIANTS[:4])
def test_mean_compensation_is_exact_and_variance_second_order(variant):
    """μ is linear in θ: Eq. 7 recovers μ(θ_new) exactly; Eq. 8's error shrinks as |Δθ|²."""
    y, w, b, s, p, d, g = _conv_case(variant, bias=True)
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, var = batch_moments(x)
    patch = patch_mean(y, w.shape[2:], x.shape[2:], s, p, d)
    var_grad = _var_grad(y, x, mean, w, s, p, d, g)
    mean_ref = linear_term_mean(patch[None], w, b, g)
    var_ref = linear_term_var(var_grad[None], w)
    direction = torch.randn(w.shape, dtype=w.dtype, generator=torch.Generator().manual_seed(3))
    bias_step = torch.randn(b.shape, dtype=b.dtype, generator=torch.Generator().manual_seed(4))
    errors = []
    for step in (5e-3, 2.5e-3):
        w_new, b_new = w + step * direction, b + step * bias_step
        true_mean, true_var = batch_moments(F.conv2d(y, w_new, b_new, s, p, d, g))
        comp_mean, comp_var = compensate_history(mean[None], var[None], mean_ref, var_ref, patch[None],
                                                 var_grad[None], torch.ones(1, dtype=w.dtype),
                                                 w_new, b_new, g)
        torch.testing.assert_close(comp_mean[0], true_mean, rtol=1e-10, atol=1e-10)
        errors.append((comp_var[0] - true_var).abs().max())
        naive_error = (var - true_var).abs().max()
        assert errors[-1] < 0.1 * naive_error
    # halving Δθ divides the (second-order) error by ~4
    assert 3.5 < errors[0] / errors[1] < 4.5


def test_compensation_clamps_invalid_variance():
    """Eq. 10: a Taylor step that would make ν < μ² is clamped to a zero variance, never negative."""
    mean = torch.zeros(1, 3, dtype=torch.float64)
    var = torch.full((1, 3), 0.01, dtype=torch.float64)
    var_grad = torch.ones(1, 3, 2, 1, 1, dtype=torch.float64)   # ∂var/∂θ pointing up
    patch = torch.zeros(1, 2, 1, 1, dtype=torch.float64)
    w_old = torch.zeros(3, 2, 1, 1, dtype=torch.float64)
    var_ref = linear_term_var(var_grad, w_old)
    mean_ref = linear_term_mean(patch, w_old, None, 1)
    w_new = w_old - 1.0  # huge jump downwards: first order says var = 0.01 - 2 < 0
    _, comp_var = compensate_history(mean, var, mean_ref, var_ref, patch, var_grad,
                                     torch.ones(1, dtype=torch.float64), w_new, None, 1)
    assert torch.all(comp_var == 0)


def test_window_moments_equal_pooled_statistics():
    """Eqs. 9-11 with equal batch sizes are the moments of the concatenated batches."""
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randn(2, 5, 4, 3, dtype=torch.float64, generator=gen) * (i + 1) + i
               for i in range(4)]
    moments = [batch_moments(b) for b in batches]
    past_mean = torch.stack([m for m, _ in moments[1:]])
    past_var = torch.stack([v for _, v in moments[1:]])
    mean, var, k = window_moments(moments[0][0], moments[0][1], past_mean, past_var,
                                  torch.ones(3, dtype=torch.float64))
    ref_mean, ref_var = batch_moments(torch.cat(batches))
    torch.testing.assert_close(mean, ref_mean)
    torch.testing.assert_close(var, ref_var)
    assert float(k) == 4
    # invalid entries are ignored
    mean2, var2, k2 = window_moments(moments[0][0], moments[0][1], past_mean, past_var,
                                     torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    ref_mean2, ref_var2 = batch_moments(torch.cat(batches[:2]))
    torch.testing.assert_close(mean2, ref_mean2)
    torch.testing.assert_close(var2, ref_var2)
    assert float(k2) == 2


def test_merge_moments_and_gradients_equal_concatenation():
    """Pooling two calls of one iteration equals measuring their concatenation (shared heads)."""
    y, w, b, s, p, d, g = _conv_case(CONV_VARIANTS[1])
    y2 = torch.randn(5, *y.shape[1:], dtype=y.dtype, generator=torch.Generator().manual_seed(9))

    def measure(inp):
        x = F.conv2d(inp, w, b, s, p, d, g)
        mean, var = batch_moments(x)
        n = x.shape[0] * x.shape[2] * x.shape[3]
        return (torch.tensor(float(n), dtype=y.dtype), mean, var,
                patch_mean(inp, w.shape[2:], x.shape[2:], s, p, d),
                _var_grad(inp, x, mean, w, s, p, d, g))

    na, ma, va, pa, ga = measure(y)
    nb, mb, vb, pb, gb = measure(y2)
    n, m, v = merge_moments(na, ma, va, nb, mb, vb)
    patch, var_grad = merge_gradients(na / n, ma, pa, ga, mb, pb, gb, m, g)
    nr, mr, vr, pr, gr = measure(torch.cat([y, y2]))
    torch.testing.assert_close(m, mr)
    torch.testing.assert_close(v, vr)
    torch.testing.assert_close(patch, pr)
    torch.testing.assert_close(var_grad, gr)


def test_pooling_processes_compensated_moments_equals_compensating_their_union():
    """SyncCBN's maths: each process compensates its own entry (Eqs. 7-8) without Eq. 10; pooling
    those moments and then clamping equals compensating the entry of the union (same iteration,
    same weights). Here one process's first-order variance goes negative in 3 channels while the
    union's stays positive, so clamping before pooling would be wrong (checked)."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(4, 3, 3, 3, dtype=torch.float64, generator=gen)
    b = torch.randn(4, dtype=torch.float64, generator=gen)
    one_flat = torch.randn(1, 3, 7, 7, dtype=torch.float64, generator=gen) * 0.05 + 1.0
    three = torch.randn(3, 3, 7, 7, dtype=torch.float64, generator=gen) * 2.0

    def entry(inp):
        x = F.conv2d(inp, w, b, 1, 1)
        mean, var = batch_moments(x)
        count = torch.tensor([float(x.shape[0] * x.shape[2] * x.shape[3])], dtype=torch.float64)
        patch = patch_mean(inp, w.shape[2:], x.shape[2:], (1, 1), (1, 1), (1, 1))
        var_grad = variance_weight_gradient(inp, x, mean, patch, w, (1, 1), (1, 1), (1, 1), 1)
        return count, mean[None], var[None], patch[None], var_grad[None]

    small, large, union = entry(one_flat), entry(three), entry(torch.cat([one_flat, three]))
    w_new = w - 1.5 * small[4][0] / small[4][0].norm()

    def compensate(e, clamp):
        count, mean, var, patch, var_grad = e
        return compensate_history(mean, var, linear_term_mean(patch, w, b, 1),
                                  linear_term_var(var_grad, w), patch, var_grad,
                                  torch.ones(1, dtype=torch.float64), w_new, b, 1, clamp)

    def pooled(clamp):
        parts = [compensate(e, clamp) for e in (small, large)]
        _, mean, var = pool_moments(torch.stack([small[0], large[0]]),
                                    torch.stack([m for m, _ in parts]),
                                    torch.stack([v for _, v in parts]))
        return mean, var.clamp_min(0.0)

    assert int((compensate(small, False)[1] < 0).sum()) == 3
    ref_mean, ref_var = compensate(union, True)
    mean, var = pooled(clamp=False)
    torch.testing.assert_close(mean, ref_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(var, ref_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(pooled(clamp=True)[1], ref_var, rtol=1e-3)


def test_pool_moments_ignores_parts_without_values():
    counts = torch.tensor([[0.0, 3.0], [2.0, 0.0]], dtype=torch.float64)
    means = torch.tensor([[[float('nan')], [1.0]], [[2.0], [5.0]]], dtype=torch.float64)
    variances = torch.ones(2, 2, 1, dtype=torch.float64)
    count, mean, var = pool_moments(counts, means, variances)
    assert count.tolist() == [2.0, 3.0]
    assert mean.flatten().tolist() == [2.0, 1.0] and var.flatten().tolist() == [1.0, 1.0]


@pytest.mark.parametrize('history', [0, 1, 3])
def test_window_norm_backward_equals_autograd(history):
    """The closed-form backward equals autograd through the same forward; gradcheck passes."""
    gen = torch.Generator().manual_seed(history)
    c = 4
    x = torch.randn(2, c, 5, 3, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(c, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(c, dtype=torch.float64, generator=gen, requires_grad=True)
    past_mean = torch.randn(history, c, dtype=torch.float64, generator=gen)
    past_var = torch.rand(history, c, dtype=torch.float64, generator=gen)
    valid = torch.ones(history, dtype=torch.float64)
    grad_out = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    out = window_batch_norm(x, weight, bias, past_mean, past_var, valid, 1e-5)
    ref = window_batch_norm_reference(x, weight, bias, past_mean, past_var, valid, 1e-5)
    for a, r in zip(out, ref):
        torch.testing.assert_close(a, r)
    grads = torch.autograd.grad(out[0], (x, weight, bias), grad_out)
    ref_grads = torch.autograd.grad(ref[0], (x, weight, bias), grad_out)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda x_, w_, b_: window_batch_norm(x_, w_, b_, past_mean, past_var, valid, 1e-5)[0],
        (x, weight, bias))


def test_window_norm_without_history_is_batch_norm():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, generator=gen, requires_grad=True)
    empty = torch.zeros(0, 4, dtype=torch.float64)
    y = window_batch_norm(x, None, None, empty, empty, empty[:, 0], 1e-5)[0]
    ref = F.batch_norm(x, None, None, training=True, eps=1e-5)
    torch.testing.assert_close(y, ref)
    g = torch.randn(x.shape, dtype=torch.float64, generator=gen)
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], torch.autograd.grad(ref, x, g)[0])


@pytest.mark.parametrize('stride', [1, 2])
def test_expanding_1x1_conv_uses_input_covariance_exactly(stride):
    """A 1×1 conv with few input channels takes the 2·θ·Cov(y) path: equal to autograd, float64."""
    from cbn_mmdet.ops.statistics import _input_covariance_is_cheaper
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(2, 3, 9, 8, dtype=torch.float64, generator=gen).relu()
    w = torch.randn(12, 3, 1, 1, dtype=torch.float64, generator=gen)
    b = torch.randn(12, dtype=torch.float64, generator=gen)
    x = F.conv2d(y, w, b, stride)
    assert _input_covariance_is_cheaper(y, x, w, (0, 0), 1)
    mean, _ = batch_moments(x)
    d_mean, d_second = statistic_gradients_autograd(y, w, b, (stride, ) * 2, (0, 0), (1, 1), 1)
    torch.testing.assert_close(_var_grad(y, x, mean, w, (stride, ) * 2, (0, 0), (1, 1), 1),
                               d_second - 2 * mean.view(-1, 1, 1, 1) * d_mean, rtol=1e-10,
                               atol=1e-10)
    assert not _input_covariance_is_cheaper(x, y, w.transpose(0, 1), (0, 0), 1)  # a reducing 1×1


@pytest.mark.parametrize('channels_last', [False, True])
@pytest.mark.parametrize('stride', [1, 2])
def test_reducing_1x1_conv_with_few_positions_takes_a_matrix_product_exactly(stride, channels_last,
                                                                             monkeypatch):
    """A CPU 1×1 conv with few output positions forms its ∂var/∂θ product as one batched matrix
    product instead of the weight-gradient convolution: equal to autograd, float64; with the
    threshold at 0 the convolution is taken again."""
    from cbn_mmdet.ops import statistics as S
    gen = torch.Generator().manual_seed(3)
    y = torch.randn(2, 12, 9, 8, dtype=torch.float64, generator=gen).relu()
    w = torch.randn(5, 12, 1, 1, dtype=torch.float64, generator=gen)
    b = torch.randn(5, dtype=torch.float64, generator=gen)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    x = F.conv2d(y, w, b, stride)
    mean, _ = batch_moments(x)
    d_mean, d_second = statistic_gradients_autograd(y, w, b, (stride, ) * 2, (0, 0), (1, 1), 1)
    expected = d_second - 2 * mean.view(-1, 1, 1, 1) * d_mean
    for threshold, taken in ((S.MATMUL_MAX_POSITIONS, 'aten.addbmm'),
                             (0, 'aten.convolution_backward')):
        monkeypatch.setattr(S, 'MATMUL_MAX_POSITIONS', threshold)
        with OpNames() as ops:
            got = _var_grad(y, x, mean, w, (stride, ) * 2, (0, 0), (1, 1), 1)
        names = set(ops.names)
        assert taken in names and not {'aten.addbmm', 'aten.convolution_backward'} - {taken} & names
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_expanding_1x1_conv_float32_with_offset_inputs():
    """The covariance path subtracts ȳȳᵀ from a Gram matrix: accurate in float32 for inputs whose
    mean is 3× their std."""
    gen = torch.Generator().manual_seed(4)
    y = torch.randn(2, 8, 16, 16, dtype=torch.float64, generator=gen) + 3.0
    w = torch.randn(32, 8, 1, 1, dtype=torch.float64, generator=gen)
    x = F.conv2d(y, w)
    exact = _var_grad(y, x, batch_moments(x)[0], w, (1, 1), (0, 0), (1, 1), 1)
    y32, x32 = y.float(), x.float()
    approx = _var_grad(y32, x32, batch_moments(x32)[0], w.float(), (1, 1), (0, 0), (1, 1), 1)
    torch.testing.assert_close(approx.double(), exact, rtol=0, atol=1e-4 * exact.abs().max().item())


@pytest.mark.parametrize('path', ['fused', 'python'])
@pytest.mark.parametrize('variant', CONV_VARIANTS)
def test_small_conv_gradients_by_unfold_equal_the_weight_gradient_path(variant, path, monkeypatch):
    """Small CPU convs take both statistic gradients from one unfolded input (the fused op, or
    torch's unfold in the Python path): the same numbers as the patch sums + weight-gradient
    convolution used for larger ones (float64)."""
    from cbn_mmdet.ops import fused
    if path == 'fused' and fused.ops() is None:
        pytest.skip('the fused CPU ops did not build')
    with fused.disabled() if path == 'python' else contextlib.nullcontext():
        _check_unfold_path(variant, monkeypatch)


def _check_unfold_path(variant, monkeypatch):
    from cbn_mmdet.ops import statistics as S
    y, w, b, s, p, d, g = _conv_case(variant)
    x = F.conv2d(y, w, b, s, p, d, g)
    mean, _ = batch_moments(x)
    args = (y, x, mean, w, b, s, p, d, g)
    small = S.conv_statistic_gradients(*args)
    monkeypatch.setattr(S, 'UNFOLD_MAX_ELEMENTS', 0)  # every conv takes the large-conv path
    large = S.conv_statistic_gradients(*args)
    torch.testing.assert_close(small[0], large[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(small[1], large[1], rtol=1e-10, atol=1e-10)
    if w.shape[2:] != (1, 1):  # the unfold path is taken (1x1 convs have their own)
        monkeypatch.setattr(S, 'patch_mean', None)
        monkeypatch.setattr(S, 'UNFOLD_MAX_ELEMENTS', 1 << 16)
        S.conv_statistic_gradients(*args)
