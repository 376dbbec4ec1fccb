"""Double backward (``create_graph=True``, e.g. a gradient penalty) through CBN's normalisation, BRN
and SyncCBN, against compositions of plain autograd operations."""
import contextlib
import copy
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.models import BatchRenorm2d, CrossIterationBatchNorm2d as CBN
from cbn_mmdet.ops import fused, window_norm
from cbn_mmdet.ops.window_norm import WindowBatchNormFunction

import cuda_batch_norm_kernels as cuda_standins  # noqa: E402
from conftest import REPO_ROOT  # noqa: E402

EPS = 1e-5
DIMS = (0, 2, 3)
TOL = dict(rtol=1e-9, atol=1e-10)


def _c(t):
    return t.view(1, -1, 1, 1)


def reference_window_norm(x, weight, bias, past_mean, past_var, eps=EPS):
    """``γ (x − μ̄)/sqrt(σ̄² + ε) + β`` for a window of ``x``'s batch and constant past entries
    ``(T, C)``, every operation differentiable (Eqs. 9-12 with the past fixed)."""
    k = 1 + past_mean.shape[0]
    mean_x = x.mean(DIMS)
    var_x = (x - _c(mean_x)).square().mean(DIMS)
    mean = (mean_x + past_mean.sum(0)) / k
    var = (var_x + (mean_x - mean).square()
           + (past_var + (past_mean - mean).square()).sum(0)) / k
    y = (x - _c(mean)) / torch.sqrt(_c(var) + eps)
    if weight is not None:
        y = y * _c(weight)
    return y if bias is None else y + _c(bias)


def window_norm_function(x, weight, bias, past_mean, past_var, eps=EPS):
    """The same through :class:`WindowBatchNormFunction`, with the window statistics computed without
    gradient as the layer does (their dependence on ``x`` is the Function's backward's)."""
    with torch.no_grad():
        stats = x.to(torch.float64 if x.dtype == torch.float64 else torch.float32)
        k = 1 + past_mean.shape[0]
        mean_x, var_x = stats.mean(DIMS), stats.var(DIMS, correction=0)
        mean = (mean_x + past_mean.sum(0)) / k
        var = (var_x + (mean_x - mean).square()
               + (past_var + (past_mean - mean).square()).sum(0)) / k
    return WindowBatchNormFunction.apply(x, weight, bias, mean, var, mean.new_tensor(1.0 / k), eps)


def _inputs(past, affine=True, dtype=torch.float64, c=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, c, 3, 2, generator=gen, dtype=torch.float64) * 1.5 + 0.7
    weight = (torch.rand(c, generator=gen, dtype=torch.float64) + 0.5) if affine else None
    bias = torch.randn(c, generator=gen, dtype=torch.float64) if affine else None
    past_mean = torch.randn(past, c, generator=gen, dtype=torch.float64)
    past_var = torch.rand(past, c, generator=gen, dtype=torch.float64) + 0.3
    params = [t.to(dtype).requires_grad_(True) for t in (x, weight, bias) if t is not None]
    return params, past_mean, past_var


def _call(fn, params, past_mean, past_var):
    x, weight, bias = (params + [None, None])[:3]
    return fn(x, weight, bias, past_mean.to(_stats_dtype(x)), past_var.to(_stats_dtype(x)))


def _stats_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


@pytest.fixture
def cuda_path(monkeypatch):
    """Select the backward's CUDA branch, with the stand-in kernels."""
    monkeypatch.setattr(window_norm.cuda_kernels, 'applies', lambda x: True)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_reduce', cuda_standins.backward_reduce)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_elemt', cuda_standins.backward_elemt)


# ---------------------------------------------------------------- the Function
@pytest.mark.parametrize('past', [0, 2], ids=['k=1', 'k=3'])
@pytest.mark.parametrize('affine', [True, False])
def test_gradgradcheck(past, affine):
    """Finite differences of the backward (with respect to x, γ, β and grad_y) match its graph."""
    params, past_mean, past_var = _inputs(past, affine)
    assert torch.autograd.gradgradcheck(
        lambda *p: _call(window_norm_function, list(p), past_mean, past_var), params)


def _first_and_second(fn, params, past_mean, past_var, seed=1):
    """``∂(Σ y·v)/∂(x, γ, β)`` with ``v`` a constant (as in a gradient penalty, where the silent
    loss of second-order terms hides), and the gradient of ``Σ first²`` with respect to them."""
    gen = torch.Generator().manual_seed(seed)
    y = _call(fn, params, past_mean, past_var)
    v = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
    first = torch.autograd.grad((y * v).sum(), params, create_graph=True)
    penalty = sum(f.float().square().sum() if f.dtype != torch.float64 else f.square().sum()
                  for f in first)
    second = torch.autograd.grad(penalty, params, allow_unused=True)  # (none on β)
    second = tuple(torch.zeros_like(p) if s is None else s for s, p in zip(second, params))
    return y, first, second


@pytest.mark.parametrize('past', [0, 2], ids=['k=1', 'k=3'])
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('branch', ['cpu', 'cuda'])
def test_second_derivatives_equal_the_composite_float64(request, branch, past, affine):
    """First and second derivatives equal the plain-autograd composite, on the CPU branch and the
    CUDA branch (stand-in kernels), and the create_graph path's first derivatives equal the fused
    path's."""
    if branch == 'cuda':
        request.getfixturevalue('cuda_path')
    params, past_mean, past_var = _inputs(past, affine)
    y, first, second = _first_and_second(window_norm_function, params, past_mean, past_var)
    y_ref, first_ref, second_ref = _first_and_second(reference_window_norm, params, past_mean,
                                                     past_var)
    torch.testing.assert_close(y, y_ref, **TOL)
    for a, b in zip(first + second, first_ref + second_ref):
        torch.testing.assert_close(a, b, **TOL)
    assert second[0].abs().max() > 1e-3  # (not vacuous)
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(y.shape, generator=gen, dtype=torch.float64)
    fused = torch.autograd.grad((_call(window_norm_function, params, past_mean, past_var) * v).sum(),
                                params)
    for a, b in zip(fused, first):
        torch.testing.assert_close(a, b, **TOL)


def one_call_window_norm(x, weight, bias, past_mean, past_var, eps=EPS):
    """The same through the one-call step's C++ autograd node (``normalise``)."""
    with torch.no_grad():
        k = 1 + past_mean.shape[0]
        mean_x, var_x = x.mean(DIMS), x.var(DIMS, correction=0)
        mean = (mean_x + past_mean.sum(0)) / k
        var = (var_x + (mean_x - mean).square()
               + (past_var + (past_mean - mean).square()).sum(0)) / k
    return fused.one_call_ops().normalise(x, weight, bias, mean, var, (var + eps).rsqrt(),
                                          mean.new_tensor(1.0 / k), eps)


def _third_derivatives(fn, params, past_mean, past_var, seed=2):
    """Directional third derivatives: ``∂/∂p <∂/∂p <∂(Σ y·v)/∂p, u>, w>``."""
    gen = torch.Generator().manual_seed(seed)

    def like(t):
        return torch.randn(t.shape, generator=gen, dtype=t.dtype)
    y = _call(fn, params, past_mean, past_var)
    first = torch.autograd.grad((y * like(y)).sum(), params, create_graph=True)
    second = torch.autograd.grad(sum((f * like(f)).sum() for f in first), params,
                                 create_graph=True, allow_unused=True)
    third = torch.autograd.grad(sum((s * like(s)).sum() for s in second if s is not None),
                                params, allow_unused=True)
    return [torch.zeros_like(p) if t is None else t for t, p in zip(third, params)]


@pytest.mark.parametrize('function', ['python', 'one_call', 'python_cuda_branch'])
@pytest.mark.parametrize('affine', [True, False])
def test_third_derivatives_equal_the_composite_float64(request, function, affine):
    """The differentiable backward is itself differentiable to every order: third derivatives (a
    gradient penalty's Hessian-vector products) equal the plain-autograd composite. Terms of the
    backward that vanish at the evaluation point with their first derivative (the window shift's
    square) show only here."""
    if function == 'one_call' and fused.one_call_ops() is None:
        pytest.skip('the fused CPU ops did not build here')
    if function == 'python_cuda_branch':
        request.getfixturevalue('cuda_path')
    fn = one_call_window_norm if function == 'one_call' else window_norm_function
    params, past_mean, past_var = _inputs(2, affine)
    got = _third_derivatives(fn, params, past_mean, past_var)
    ref = _third_derivatives(reference_window_norm, params, past_mean, past_var)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, **TOL)
    assert got[0].abs().max() > 1e-3  # (not vacuous)


@pytest.mark.parametrize('dtype', [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize('branch', ['cpu', 'cuda'])
def test_second_derivatives_in_lower_precision(request, branch, dtype):
    """float32, and float16/bfloat16 input and parameters with float32 statistics (the generic CPU
    branch; the CUDA branch's dtype rules): gradients in the input's dtype, close to the float64
    composite."""
    if branch == 'cuda':
        request.getfixturevalue('cuda_path')
    params, past_mean, past_var = _inputs(2, dtype=dtype)
    _, first, second = _first_and_second(window_norm_function, params, past_mean, past_var)
    wide = [p.detach().double().requires_grad_(True) for p in params]
    _, first_ref, second_ref = _first_and_second(reference_window_norm, wide, past_mean, past_var)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=0.03, atol=0.03)
    for a, b, p in zip(first + second, first_ref + second_ref, params + params):
        assert a.dtype == p.dtype
        torch.testing.assert_close(a.double(), b, **tol)


def test_channels_last_double_backward_keeps_the_memory_format():
    params, past_mean, past_var = _inputs(2)
    params[0] = params[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    _, first, second = _first_and_second(window_norm_function, params, past_mean, past_var)
    _, first_ref, second_ref = _first_and_second(reference_window_norm, params, past_mean, past_var)
    assert first[0].is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(first + second, first_ref + second_ref):
        torch.testing.assert_close(a, b, **TOL)


# ---------------------------------------------------------------- the layers
def _penalty_grads(model, x, v):
    """The input gradient ``g = ∂(Σ y·v)/∂x`` (graph kept) and the gradients of ``‖g‖²`` on the
    parameters."""
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad((model(x) * v).sum(), x, create_graph=True)
    model.zero_grad()
    g.square().sum().backward()
    return g.detach(), {k: torch.zeros_like(p) if p.grad is None else p.grad.clone()
                        for k, p in model.named_parameters()}  # (β: not in g, so None)


def _batch(seed, c_out=4):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 5, 4, generator=gen, dtype=torch.float64) + 0.3 * seed
    return x, torch.randn(2, c_out, 5, 4, generator=gen, dtype=torch.float64)


def _conv_norm(norm, seed=0):
    """conv → norm in float64 with non-trivial γ, β."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return model


def _assert_grads_close(got, ref):
    g, grads = got
    g_ref, grads_ref = ref
    torch.testing.assert_close(g, g_ref, **TOL)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], **TOL, msg=name)


def test_cbn_with_an_empty_window_is_batch_norm_under_double_backward():
    """The first training forward of a fresh CBN (empty window) is BN: the input gradient and the
    gradient penalty's gradients on the conv and on γ, β equal ``nn.BatchNorm2d``'s."""
    x, v = _batch(0)
    cbn = _penalty_grads(_conv_norm(CBN(4, window=3)), x, v)
    bn = _penalty_grads(_conv_norm(nn.BatchNorm2d(4)), x, v)
    _assert_grads_close(cbn, bn)


class _Reference(nn.Module):
    """conv → :func:`reference_window_norm` with the layer's parameters and given past entries."""

    def __init__(self, model, past_mean, past_var):
        super().__init__()
        self.conv, norm = copy.deepcopy(model[0]), model[1]
        self.weight = nn.Parameter(norm.weight.detach().clone())
        self.bias = nn.Parameter(norm.bias.detach().clone())
        self.past_mean, self.past_var = past_mean, past_var

    def forward(self, x):
        return reference_window_norm(self.conv(x), self.weight, self.bias, self.past_mean,
                                     self.past_var)


def _named_like(model, grads):
    """The reference's gradients under the CBN model's parameter names."""
    return {'0.weight': grads['conv.weight'], '0.bias': grads['conv.bias'],
            '1.weight': grads['weight'], '1.bias': grads['bias']}


def _train_two_steps(model):
    """Two SGD steps (the iteration clock advances on them); returns the conv outputs seen."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs = []
    model[0].register_forward_hook(lambda m, inp, out: outputs.append(out.detach().clone()))
    for step in (1, 2):
        x, v = _batch(step)
        (model(x) * v).sum().backward()
        opt.step()
        opt.zero_grad()
    return outputs


def test_cbn_with_a_full_window_equals_the_composite_naive():
    """Window 3 after two SGD steps, without compensation: the past entries are the recorded conv
    outputs' moments, taken here independently of the layer; output, input gradient and gradient
    penalty's gradients equal the composite's."""
    model = _conv_norm(CBN(4, window=3, compensate=False))
    outputs = _train_two_steps(model)
    past_mean = torch.stack([o.mean(DIMS) for o in outputs])
    past_var = torch.stack([o.var(DIMS, correction=0) for o in outputs])
    ref = _Reference(model, past_mean, past_var)
    x, v = _batch(3)
    with torch.no_grad():  # (no_grad changes no state of the layer)
        torch.testing.assert_close(model(x), ref(x), **TOL)
    got = _penalty_grads(model, x, v)
    g_ref, grads_ref = _penalty_grads(ref, x, v)
    _assert_grads_close(got, (g_ref, _named_like(model, grads_ref)))


@pytest.mark.parametrize('path', ['one_call', 'python'])
def test_cbn_with_a_full_window_equals_the_composite_compensated(path):
    """The same with the compensated past (Eqs. 7-8, constants for the gradients): the reference gets
    the two compensated past entries the layer's window used (``past_window()``), through the
    one-call step's C++ autograd node on CPU and through the Python path."""
    with (fused.disabled() if path == 'python' else contextlib.nullcontext()):
        model = _conv_norm(CBN(4, window=3))
        _train_two_steps(model)
        x, v = _batch(3)
        got = _penalty_grads(model, x, v)
    past = model[1].past_window()
    used = past['valid'] > 0
    assert int(used.sum()) == 2
    ref = _Reference(model, past['mean_compensated'][used], past['var_compensated'][used])
    g_ref, grads_ref = _penalty_grads(ref, x, v)
    _assert_grads_close(got, (g_ref, _named_like(model, grads_ref)))


def _brn_reference(brn, x):
    """Algorithm 1 of Ioffe 2017 in plain operations, ``r, d`` constants (before the update)."""
    mean_b = x.mean(DIMS)
    sigma_b = torch.sqrt((x - _c(mean_b)).square().mean(DIMS) + brn.eps)
    r_max, d_max = brn.current_limits
    with torch.no_grad():
        sigma = torch.sqrt(brn.running_var + brn.eps)
        r = (sigma_b / sigma).clamp(1.0 / r_max, r_max)
        d = ((mean_b - brn.running_mean) / sigma).clamp(-d_max, d_max)
    return _c(brn.weight) * ((x - _c(mean_b)) / _c(sigma_b) * _c(r) + _c(d)) + _c(brn.bias)


def test_brn_double_backward_equals_plain_autograd():
    """BRN past its warm-up, with r and d clipped in some channels: input gradient and gradient
    penalty's gradients equal Algorithm 1 written in plain operations."""
    def make():
        brn = BatchRenorm2d(4, warmup_iters=0, rmax_iters=1, dmax_iters=1, rmax=1.2, dmax=0.3)
        brn.running_var.copy_(torch.tensor([0.3, 1.0, 4.0, 9.0]))
        brn.running_mean.copy_(torch.tensor([-1.0, 0.0, 0.2, 2.0]))
        brn.num_batches_tracked.fill_(5)
        return _conv_norm(brn)

    class Reference(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.conv, self.brn = model[0], model[1]

        def forward(self, x):
            return _brn_reference(self.brn, self.conv(x))

    x, v = _batch(1)
    got = _penalty_grads(make(), x, v)
    ref_model = make()
    g_ref, grads_ref = _penalty_grads(Reference(ref_model), x, v)
    grads_ref = {k.replace('conv.', '0.').replace('brn.', '1.'): t for k, t in grads_ref.items()}
    _assert_grads_close(got, (g_ref, grads_ref))
    with torch.no_grad():  # the clipping is active: not BN, not the running-statistics norm
        conv_out = ref_model[0](x)
        r = torch.sqrt(conv_out.var(DIMS, correction=0) + 1e-5) / torch.sqrt(
            ref_model[1].running_var + 1e-5)
    assert ((r < 1 / 1.2) | (r > 1.2)).any() and ((r > 1 / 1.2) & (r < 1.2)).any()


# ---------------------------------------------------------------- SyncCBN
def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def test_sync_cbn_double_backward_equals_cbn_on_the_whole_batch(tmp_path):
    """2 gloo processes, three gradient-penalty steps (empty window, then k = 2 and 3, the last with
    no images on one process): each process's input gradient is its share of CBN's on the whole
    batch, and the summed penalty gradients equal CBN's, on the CPU branch and the CUDA branch."""
    from sync_cbn_double_backward_worker import SIZES, penalty_training, share
    from sync_cbn_worker import WINDOW
    worker = os.path.join(REPO_ROOT, 'tests', 'helpers', 'sync_cbn_double_backward_worker.py')
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, worker, str(r), '2', port,
                               str(tmp_path / f'rank{r}.pt')], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        logs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    results = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    whole = penalty_training(lambda c: CBN(c, window=WINDOW))
    for branch in ('cpu', 'cuda'):
        for step, (g, grads) in enumerate(whole):
            for rank, result in enumerate(results):
                g_rank, grads_rank = result[branch][step]
                assert g_rank.shape[0] == SIZES[step][rank]
                torch.testing.assert_close(g_rank, share(g, step, rank), **TOL)
                for name, value in grads.items():
                    torch.testing.assert_close(grads_rank[name], value, **TOL,
                                               msg=f'{branch} step {step} {name}')
