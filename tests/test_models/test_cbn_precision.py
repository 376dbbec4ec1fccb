"""Precision and device paths on CPU: the CUDA backward through stand-ins of its kernels, autocast,
half-precision modules, no host synchronisation in steady state, and the smaller numerical guards."""
import copy

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN, iteration_clock
from cbn_mmdet.ops import fused
from cbn_mmdet.ops import statistics as S
from cbn_mmdet.ops import window_norm

import cuda_batch_norm_kernels as cuda_standins  # noqa: E402
import gpu_check  # noqa: E402


def _net(c_in=3, c=6, dtype=torch.float64, affine=True, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), CBN(c, window=3, affine=affine),
                         nn.ReLU(), nn.Conv2d(c, c, 1, bias=False),
                         CBN(c, window=3, affine=affine)).to(dtype)


def _train(model, steps=3, dtype=torch.float64, channels_last=False, autocast=None, seed=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(seed)
    grads = []
    for _ in range(steps):
        x = torch.randn(2, 3, 7, 6, generator=gen, dtype=torch.float64).to(dtype) + 0.3
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_(True)
        if autocast:
            with torch.autocast('cpu', dtype=autocast):
                out = model(x)
        else:
            out = model(x)
        g = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out.dtype)
        opt.zero_grad()
        (out * g).sum().backward()
        grads.append([x.grad.clone()] + [p.grad.clone() for p in model.parameters()
                                          if p.grad is not None])
        opt.step()
    return grads


def _cpu_conv_supports(dtype):
    try:
        F.conv2d(torch.ones(1, 1, 3, 3, dtype=dtype), torch.ones(1, 1, 1, 1, dtype=dtype))
        return True
    except RuntimeError:  # torch 2.1's CPU build has no float16 convolution
        return False


MODULE_DTYPES = [pytest.param(d, marks=pytest.mark.skipif(
    not _cpu_conv_supports(d), reason=f'no {d} convolution on this CPU build of torch'))
    for d in (torch.bfloat16, torch.float16)]


@pytest.fixture
def cuda_path(monkeypatch):
    """Route CBN's backward through the CUDA branch, with the stand-in kernels."""
    monkeypatch.setattr(window_norm.cuda_kernels, 'applies', lambda x: True)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_reduce', cuda_standins.backward_reduce)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_elemt', cuda_standins.backward_elemt)


@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_cuda_backward_equals_cpu_backward_float64(cuda_path, monkeypatch, affine, channels_last):
    """Input, γ/β and conv gradients of the CUDA branch equal the CPU branch's (float64)."""
    cuda_grads = _train(_net(affine=affine), channels_last=channels_last)
    monkeypatch.setattr(window_norm.cuda_kernels, 'applies', lambda x: False)
    cpu_grads = _train(_net(affine=affine), channels_last=channels_last)
    for step_cuda, step_cpu in zip(cuda_grads, cpu_grads):
        assert len(step_cuda) == len(step_cpu)
        for a, b in zip(step_cuda, step_cpu):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('module_dtype', MODULE_DTYPES)
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('channels_last', [False, True])
def test_cuda_backward_of_half_precision_module(cuda_path, module_dtype, affine, channels_last):
    """A .half()/.bfloat16() module passes the kernels' dtype rules (γ cast to the statistics'
    precision, as SyncBN does) and gets gradients in its own dtype."""
    model = _net(dtype=module_dtype, affine=affine)
    grads = _train(model, dtype=module_dtype, channels_last=channels_last)
    for step in grads:
        for g in step:
            assert g.dtype == module_dtype and torch.isfinite(g.float()).all()


def test_standins_reject_what_cuda_rejects():
    """The stand-ins are strict: a half γ with float32 statistics fails the contiguous elemt kernel,
    and channels-last reduce without γ returns empty gradient tensors (not None)."""
    x = torch.randn(2, 3, 4, 4).half()
    mean, invstd = torch.zeros(3), torch.ones(3)
    sums = torch.zeros(3), torch.zeros(3)
    with pytest.raises(RuntimeError, match='weight'):
        cuda_standins.backward_elemt(x, x, mean, invstd, torch.ones(3).half(), *sums,
                                     torch.tensor([32], dtype=torch.int32))
    cl = x.contiguous(memory_format=torch.channels_last)
    _, _, gw, gb = cuda_standins.backward_reduce(cl, cl, mean, invstd, None, True, False, False)
    assert gw is not None and gw.numel() == 0 and gb.numel() == 0


# ---------------------------------------------------------------- autocast
def test_autocast_correction_is_computed_in_float32():
    """Inside torch.autocast (CPU bfloat16) the Taylor correction equals a float64 evaluation of the
    same formula from the same (bfloat16) conv input and output, to 1e-3 of the correction."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(16, 32, 3, padding=1), CBN(32, window=2)
    captured = []
    conv.register_forward_hook(lambda m, inp, out: captured.append((inp[0], out)))
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(2, 16, 12, 12, generator=gen).relu() + 0.5 for _ in range(2)]
    w_old = conv.weight.detach().clone()
    b_old = conv.bias.detach().clone()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        norm(conv(xs[0])).float().sum().backward()
    with torch.no_grad():
        conv.weight.add_(0.05 * torch.randn_like(conv.weight))
        conv.bias.add_(0.05)
    iteration_clock.next_iteration()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        norm(conv(xs[1]))
    window = norm.past_window()
    slot = window['valid'].nonzero()[0, 0]
    got_mean = (window['mean_compensated'] - window['mean'])[slot].double()
    got_var = (window['var_compensated'] - window['var'])[slot].double()

    want_mean, want_var = gpu_check.float64_correction(  # from what the bf16 conv saw and made
        xs[0].to(torch.bfloat16), captured[0][1], (w_old, b_old),
        (conv.weight.detach(), conv.bias.detach()))
    assert want_var.abs().max() > 1e-3  # a correction worth measuring
    assert (got_mean - want_mean).abs().max() <= 1e-3 * want_mean.abs().max()
    assert (got_var - want_var).abs().max() <= 1e-3 * want_var.abs().max()


def test_autocast_training_matches_float32_training():
    """bf16 autocast training follows float32 training (loose: the convs run in bf16)."""
    ref = _train(_net(dtype=torch.float32), dtype=torch.float32)
    amp = _train(_net(dtype=torch.float32), dtype=torch.float32, autocast=torch.bfloat16)
    for a, r in zip(amp[-1][1:], ref[-1][1:]):
        assert (a.float() - r).abs().max() <= 0.1 * r.abs().max() + 1e-3


# ---------------------------------------------------------------- half-precision modules
@pytest.mark.parametrize('module_dtype', MODULE_DTYPES)
def test_half_precision_module_keeps_float32_statistics(module_dtype):
    model = _net(dtype=torch.float32)
    ref = copy.deepcopy(model)
    model.to(module_dtype)
    grads = _train(model, dtype=module_dtype)
    ref_grads = _train(ref, dtype=torch.float32)
    for norm in (model[1], model[4]):
        assert norm.history_length == 2
        for name in ('history_mean', 'history_var', 'history_var_grad', 'history_mean_ref'):
            assert norm.history.get(name).dtype == torch.float32, name
        assert norm.running_mean.dtype == module_dtype  # like BN's .half()
    for a, r in zip(grads[-1][1:], ref_grads[-1][1:]):
        assert (a.float() - r).abs().max() <= 0.1 * r.abs().max() + 1e-2
    model.half()  # moving again keeps the history's precision
    assert model[1].history.get('history_var').dtype == torch.float32


# ---------------------------------------------------------------- no host synchronisation
class _HostTraffic(TorchDispatchMode):
    """Records operations that move values between host and device: tensors read back to Python
    (``.item()``, ``float(t)``, ``bool(t)``) and tensors made from Python data (``torch.tensor``)."""
    FLAGGED = ('aten._local_scalar_dense', 'aten.lift_fresh', 'aten.lift_fresh_copy',
               'aten.is_nonzero', 'aten.equal', 'aten.item')

    def __init__(self):
        super().__init__()
        self.flagged = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith(self.FLAGGED):
            self.flagged.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('options', [dict(), dict(momentum=None), dict(running_stats='batch'),
                                     dict(monitor=True)])
def test_no_host_sync_in_steady_state(options):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3, **options)
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.1)
    gen = torch.Generator().manual_seed(0)
    for step in range(10):
        x = torch.randn(2, 3, 6, 6, generator=gen)
        mode = _HostTraffic()
        with mode:
            y = norm(conv(x))
            y.square().sum().backward()
        # the first iterations allocate the history and make the window mask of each new cursor
        # position once; from then on no value crosses between host and device
        if step >= 2 * norm.window:
            assert mode.flagged == [], (step, mode.flagged)
        opt.step()
        opt.zero_grad()
    assert norm.history_length == 2


# ---------------------------------------------------------------- smaller guards
def test_conv_bias_frozen_midway_discards_its_gradients():
    """A conv bias that stops training: the recorded mean reference included it, so the past entries
    are used as recorded (with a warning), never compensated with an unmatched bias term."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1).double(), CBN(4, window=3).double()
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    for x in xs[:2]:
        norm(conv(x)).sum().backward()
        with torch.no_grad():
            conv.bias.add_(0.5)
            conv.weight.mul_(1.1)
        iteration_clock.next_iteration()
    conv.bias.requires_grad_(False)
    with pytest.warns(UserWarning, match='bias became trainable or frozen'):
        norm(conv(xs[2]))
    window = norm.past_window()
    torch.testing.assert_close(window['mean_compensated'], window['mean'])


def test_non_finite_statistic_gradients_never_enter_the_history(monkeypatch):
    # (the overflow is injected into the Python function, which the one-call step does not call;
    # test_cbn_fused.py overflows the gradients of both through the input)
    with fused.without_one_call():
        _overflow_one_entry(monkeypatch)


def _overflow_one_entry(monkeypatch):
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3)
    real = S.conv_statistic_gradients
    calls = []

    def overflowing(*args, **kwargs):
        calls.append(1)
        patch, grad = real(*args, **kwargs)
        return patch, (grad.fill_(float('inf')) if len(calls) == 2 else grad)

    monkeypatch.setattr('cbn_mmdet.models.cbn.conv_statistic_gradients', overflowing)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        norm(conv(torch.randn(2, 3, 6, 6, generator=gen))).sum().backward()
        with torch.no_grad():
            conv.weight.mul_(1.05)
        iteration_clock.next_iteration()
    assert torch.isfinite(norm.history.get('history_var_grad')).all()  # anywhere in the ring
    entries = norm.history.entries()  # newest first: iteration 3, iteration 2 (overflowed)
    assert entries[1].compensable == 0 and entries[0].compensable == 1
    out = norm(conv(torch.randn(2, 3, 6, 6, generator=gen)))
    assert torch.isfinite(out).all() and torch.isfinite(norm.running_var).all()


# ---------------------------------------------------------------- TF32
def _tf32(t):
    """Round float32 values to TF32 (10 explicit mantissa bits), as cuDNN/cuBLAS do to operands."""
    bits = t.float().contiguous().view(torch.int32)
    return ((bits + 0x1000) & -0x2000).view(torch.float32)


@pytest.mark.parametrize('kernel,c_in,c_out', [(3, 8, 8), (1, 4, 16)])
def test_centred_variance_gradient_survives_tf32(monkeypatch, kernel, c_in, c_out):
    """With the product's operands rounded to TF32, the centred ∂var/∂θ (used on CUDA) stays within
    1e-3 of the exact one even for outputs whose mean is 10× their spread; the uncentred form, exact
    in float32, loses far more."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, c_in, 10, 10, generator=gen, dtype=torch.float64).relu() + 2.0
    w = 0.2 * torch.randn(c_out, c_in, kernel, kernel, generator=gen, dtype=torch.float64)
    x = F.conv2d(y, w, torch.full((c_out, ), 20.0, dtype=torch.float64), padding=kernel // 2)
    pad = (kernel // 2, ) * 2
    mean, _ = S.batch_moments(x)
    patch = S.patch_mean(y, (kernel, kernel), x.shape[2:], (1, 1), pad, (1, 1))
    exact = S.variance_weight_gradient(y, x, mean, patch, w, (1, 1), pad, (1, 1), 1)
    real_wg, real_gram = S.weight_gradient, S.gram
    monkeypatch.setattr(S, 'weight_gradient', lambda g, i, *a: real_wg(_tf32(g), _tf32(i), *a))
    monkeypatch.setattr(S, 'gram', lambda flat: real_gram(_tf32(flat)))
    args = (y.float(), x.float(), mean.float(), patch.float(), w.float(), (1, 1), pad, (1, 1), 1)
    centred = S.variance_weight_gradient(*args, centred=True).double()
    uncentred = S.variance_weight_gradient(*args, centred=False).double()
    scale = exact.abs().max()
    assert (centred - exact).abs().max() <= 1e-3 * scale
    assert (uncentred - exact).abs().max() >= 5 * (centred - exact).abs().max()


# ---------------------------------------------------------------- bfloat16 ∂var/∂θ product
@pytest.mark.parametrize('kernel,groups,c_in,c_out', [(3, 1, 8, 16), (3, 2, 8, 16), (1, 1, 8, 16),
                                                      (1, 1, 16, 8)])
def test_bfloat16_variance_gradient_within_its_rounding(kernel, groups, c_in, c_out):
    """bfloat16 operands (float32 accumulation, centred) stay within a few 2⁻⁹ of the exact ∂var/∂θ,
    also for outputs whose mean is 10× their spread (the uncentred sum would cancel). The reducing
    1×1 conv takes the CPU's matrix product, on bfloat16 operands too."""
    gen = torch.Generator().manual_seed(0)
    y = torch.randn(2, c_in, 10, 10, generator=gen, dtype=torch.float64).relu() + 2.0
    w = 0.2 * torch.randn(c_out, c_in // groups, kernel, kernel, generator=gen, dtype=torch.float64)
    x = F.conv2d(y, w, torch.full((c_out, ), 20.0, dtype=torch.float64), padding=kernel // 2,
                 groups=groups)
    pad = (kernel // 2, ) * 2
    mean, _ = S.batch_moments(x)
    patch = S.patch_mean(y, (kernel, kernel), x.shape[2:], (1, 1), pad, (1, 1))
    exact = S.variance_weight_gradient(y, x, mean, patch, w, (1, 1), pad, (1, 1), groups)
    got = S.variance_weight_gradient(y.float(), x.float(), mean.float(), patch.float(), w.float(),
                                     (1, 1), pad, (1, 1), groups, operand_dtype=torch.bfloat16)
    assert got.dtype == torch.float32
    assert (got.double() - exact).norm() <= 8 * 2**-9 * exact.norm()
    if c_in > c_out:  # rounded as bfloat16 operands round, not exact as float32 would be
        assert (got.double() - exact).norm() >= 2**-12 * exact.norm()


# (on a CPU without AVX-512 the layer warns that the product is slow there: tested below)
@pytest.mark.filterwarnings(r"ignore:CBN\(\d+\). var_grad_dtype='bfloat16' on a CPU without:UserWarning")
def test_bfloat16_product_moves_the_correction_by_a_fraction_of_a_percent():
    """The same iterations (weights changed by hand, no training feedback) with the float32 and the
    bfloat16 product: the compensated statistics differ by < 1 % of the correction."""
    windows = {}
    for var_grad_dtype in ('float32', 'bfloat16'):
        torch.manual_seed(0)
        conv = nn.Conv2d(16, 32, 3, padding=1)
        norm = CBN(32, window=4, var_grad_dtype=var_grad_dtype)
        gen = torch.Generator().manual_seed(1)
        for _ in range(4):
            norm(conv(torch.randn(2, 16, 12, 12, generator=gen) + 0.5))
            with torch.no_grad():
                conv.weight.add_(0.02 * torch.randn(conv.weight.shape, generator=gen))
            iteration_clock.next_iteration()
        norm(conv(torch.randn(2, 16, 12, 12, generator=gen) + 0.5))
        windows[var_grad_dtype] = norm.past_window()
    ref, bf16 = windows['float32'], windows['bfloat16']
    torch.testing.assert_close(bf16['var'], ref['var'], rtol=0, atol=0)  # same recorded statistics
    correction = (ref['var_compensated'] - ref['var']).abs().sum()
    assert correction > 0
    assert (bf16['var_compensated'] - ref['var_compensated']).abs().sum() < 1e-2 * correction
    assert 'var_grad_dtype' in repr(norm)
    with pytest.raises(ValueError, match='var_grad_dtype'):
        CBN(4, var_grad_dtype='float16')


@pytest.mark.parametrize('fast, var_grad_dtype, warns', [
    (False, 'bfloat16', True), (True, 'bfloat16', False), (False, 'float32', False)])
def test_a_slow_bfloat16_product_on_this_cpu_is_said_once(monkeypatch, fast, var_grad_dtype, warns):
    """Without oneDNN's bfloat16 kernels (no AVX-512) torch takes its slow reference kernel for the
    bfloat16 product: the layer says so once, naming the faster setting."""
    import cbn_mmdet.models.cbn as cbn_module
    monkeypatch.setattr(cbn_module, 'cpu_has_fast_bfloat16', lambda: fast)
    conv, norm = nn.Conv2d(3, 4, 3), CBN(4, window=2, var_grad_dtype=var_grad_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        for _ in range(3):
            norm(conv(torch.randn(2, 3, 6, 6)))
            iteration_clock.next_iteration()
    said = [str(w.message) for w in caught if 'slow reference kernel' in str(w.message)]
    assert len(said) == (1 if warns else 0)
    if warns:
        assert "var_grad_dtype='float32'" in said[0]
