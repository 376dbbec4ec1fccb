"""BatchRenorm2d: BN equivalence, an independent autograd reference, clipping, schedule, state, mmdet, errors."""
import copy
import io

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.models import BatchRenorm2d as BRN

C = 6


def _batch(seed, n=4, h=5, w=3, dtype=torch.float64, offsets=None, scales=None):
    """A batch whose channels have different means and spreads, so r and d differ per channel."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((n, C, h, w), dtype=torch.float64, generator=gen)
    scales = torch.tensor([0.2, 0.6, 1.0, 1.5, 3.0, 5.0] if scales is None else scales,
                          dtype=torch.float64)
    offsets = torch.tensor([-3.0, -0.4, 0.0, 0.3, 1.0, 4.0] if offsets is None else offsets,
                           dtype=torch.float64)
    return (x * scales.view(1, -1, 1, 1) + offsets.view(1, -1, 1, 1)).to(dtype)


def _randomise_affine(*mods, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(C, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    b = torch.empty(C, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen)
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
            m.bias.copy_(b)


def _reference_step(x, weight, bias, running_mean, running_var, r_max, d_max, eps, momentum):
    """Algorithm 1 of Ioffe 2017 written out literally (stop-gradient = detach), BN-style running stats."""
    mu_b = x.mean(dim=(0, 2, 3), keepdim=True)
    var_b = ((x - mu_b) ** 2).mean(dim=(0, 2, 3), keepdim=True)
    sigma_b = torch.sqrt(var_b + eps)
    sigma = torch.sqrt(running_var + eps).view(1, -1, 1, 1)
    r = torch.clamp(sigma_b / sigma, 1.0 / r_max, r_max).detach()
    d = torch.clamp((mu_b - running_mean.view(1, -1, 1, 1)) / sigma, -d_max, d_max).detach()
    y = weight.view(1, -1, 1, 1) * ((x - mu_b) / sigma_b * r + d) + bias.view(1, -1, 1, 1)
    m = x.numel() // x.shape[1]
    new_mean = (1 - momentum) * running_mean + momentum * mu_b.detach().flatten()
    new_var = (1 - momentum) * running_var + momentum * var_b.detach().flatten() * m / (m - 1)
    return y, new_mean, new_var, r.flatten(), d.flatten()


# ---------------------------------------------------------------- r = 1, d = 0 is BatchNorm2d
@pytest.mark.parametrize('kwargs', [
    dict(rmax=1.0, dmax=0.0, warmup_iters=0),           # no correction allowed at all
    dict(),                                              # paper defaults: inside the 5k warm-up
    dict(rmax=3.0, dmax=5.0, warmup_iters=3, rmax_iters=10, dmax_iters=10),  # t = 0..3 is warm-up
])
@pytest.mark.parametrize('channels_last', [False, True])
def test_equals_batchnorm(kwargs, channels_last):
    brn = BRN(C, **kwargs).double()
    bn = nn.BatchNorm2d(C).double()
    _randomise_affine(brn, bn)
    for step in range(4):
        x = _batch(step)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, y_ref = brn(x1), bn(x2)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        g = _batch(100 + step)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-14)
        assert int(brn.num_batches_tracked) == int(bn.num_batches_tracked) == step + 1
        brn.zero_grad(), bn.zero_grad()
    brn.eval(), bn.eval()
    bn.load_state_dict(brn.state_dict())  # equal up to rounding above; now bit-identical
    x = _batch(7)
    assert torch.equal(brn(x), bn(x))  # eval is BN's own forward
    assert int(brn.num_batches_tracked) == 4  # eval forwards are not counted


def test_cumulative_momentum_equals_batchnorm():
    """momentum=None (1/n, n counting training forwards) in the warm-up is BN's cumulative average."""
    brn, bn = BRN(C, momentum=None).double(), nn.BatchNorm2d(C, momentum=None).double()
    for step in range(4):
        x = _batch(step)
        torch.testing.assert_close(brn(x), bn(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(brn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(brn.running_var, bn.running_var, rtol=1e-12, atol=1e-14)


def test_batchnorm_equivalence_ends_with_warmup():
    """Guard for the test above: once r and d are free, the same data no longer gives BN's output."""
    brn, bn = BRN(C, warmup_iters=1, rmax_iters=2, dmax_iters=2).double(), nn.BatchNorm2d(C).double()
    for step in range(3):
        x = _batch(step)
        y, y_ref = brn(x), bn(x)
        if step <= 1:
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y, y_ref, atol=1e-3)


# ---------------------------------------------------------------- active r, d: independent reference
@pytest.mark.parametrize('momentum', [0.1, 0.5])
def test_matches_autograd_reference(momentum):
    eps = 1e-5
    # limits by hand for warmup 1, rmax_iters 3, dmax_iters 2, rmax 3, dmax 0.5 (t = forwards before)
    schedule = [(1.0, 0.0), (1.0, 0.0), (2.0, 0.5), (3.0, 0.5), (3.0, 0.5)]
    brn = BRN(C, eps=eps, momentum=momentum, rmax=3.0, dmax=0.5, warmup_iters=1, rmax_iters=3,
              dmax_iters=2).double()
    _randomise_affine(brn)
    weight = brn.weight.detach().clone().requires_grad_()
    bias = brn.bias.detach().clone().requires_grad_()
    running_mean = torch.zeros(C, dtype=torch.float64)
    running_var = torch.ones(C, dtype=torch.float64)
    clipped_r = clipped_d = free_r = free_d = 0
    for step, (r_max, d_max) in enumerate(schedule):
        assert brn.current_limits == pytest.approx((r_max, d_max))
        x = _batch(step, offsets=[-3.0, -0.4, 0.0, 0.3, 1.0, 4.0 - step])
        x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
        y = brn(x1)
        y_ref, running_mean, running_var, r, d = _reference_step(
            x2, weight, bias, running_mean, running_var, r_max, d_max, eps, momentum)
        torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-11)
        g = _batch(50 + step)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(brn.weight.grad, weight.grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(brn.bias.grad, bias.grad, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(brn.running_mean, running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(brn.running_var, running_var, rtol=1e-12, atol=1e-14)
        brn.zero_grad()
        weight.grad = bias.grad = None
        if r_max > 1:
            clipped_r += int(((r - r_max).abs() < 1e-12).sum() + ((r - 1 / r_max).abs() < 1e-12).sum())
            free_r += int(((r > 1 / r_max + 1e-9) & (r < r_max - 1e-9) & ((r - 1).abs() > 1e-3)).sum())
            clipped_d += int(((d.abs() - d_max).abs() < 1e-12).sum())
            free_d += int(((d.abs() < d_max - 1e-9) & (d.abs() > 1e-3)).sum())
    # the comparison covered clipped and unclipped channels for both r and d
    assert min(clipped_r, free_r, clipped_d, free_d) > 0, (clipped_r, free_r, clipped_d, free_d)


# ---------------------------------------------------------------- clipping
def test_clipping_hits_the_limits():
    """Channels 0/1: σ_B/σ far above rmax / below 1/rmax; 2/3: (μ_B-μ)/σ beyond ±dmax; 4/5: inside."""
    rmax, dmax, var0 = 2.0, 0.5, 4.0
    brn = BRN(C, eps=1e-5, rmax=rmax, dmax=dmax, warmup_iters=0, rmax_iters=1, dmax_iters=1).double()
    with torch.no_grad():
        brn.running_var.fill_(var0)                 # σ ≈ 2
        brn.num_batches_tracked.fill_(1)            # limits fully open
    assert brn.current_limits == (rmax, dmax)
    x = _batch(0, n=8, h=6, w=6, scales=[80.0, 0.02, 2.0, 2.0, 3.0, 2.5],
               offsets=[0.0, 0.0, 10.0, -10.0, 0.4, -0.3])
    y = brn(x)                                      # γ = 1, β = 0: y = x̂ r + d, per channel
    mu_b = x.mean(dim=(0, 2, 3))
    var_b = x.var(dim=(0, 2, 3), unbiased=False)
    r = y.std(dim=(0, 2, 3), unbiased=False) / torch.sqrt(var_b / (var_b + 1e-5))
    d = y.mean(dim=(0, 2, 3))
    sigma = (var0 + 1e-5) ** 0.5
    r_free = torch.sqrt(var_b + 1e-5) / sigma
    d_free = mu_b / sigma
    assert r_free[0] > 10 * rmax and r_free[1] < 1 / (10 * rmax)
    assert d_free[2] > 10 * dmax and d_free[3] < -10 * dmax
    torch.testing.assert_close(r[:2], torch.tensor([rmax, 1 / rmax], dtype=torch.float64))
    torch.testing.assert_close(d[2:4], torch.tensor([dmax, -dmax], dtype=torch.float64))
    # inside the limits r and d are the exact ratios (so y = (x - μ) / σ)
    assert ((r_free[4:] > 1 / rmax) & (r_free[4:] < rmax)).all()
    assert (d_free[4:].abs() < dmax).all() and (d_free[4:].abs() > 0.05).all()
    torch.testing.assert_close(r[4:], r_free[4:])
    torch.testing.assert_close(d[4:], d_free[4:])
    torch.testing.assert_close(y[:, 4:], x[:, 4:] / sigma)


# ---------------------------------------------------------------- schedule
def test_paper_default_schedule():
    m = BRN(C)
    assert (m.rmax, m.dmax, m.warmup_iters, m.rmax_iters, m.dmax_iters) == (3.0, 5.0, 5000, 40000, 25000)
    expected = {
        0: (1.0, 0.0),
        5000: (1.0, 0.0),
        15000: (1.0 + 2.0 * 10000 / 35000, 5.0 * 10000 / 20000),
        22500: (2.0, 4.375),
        25000: (1.0 + 2.0 * 20000 / 35000, 5.0),
        40000: (3.0, 5.0),
        10 ** 6: (3.0, 5.0),
    }
    for it, limits in expected.items():
        assert m.limits_at(it) == pytest.approx(limits, rel=1e-12, abs=1e-12), it
    assert m.current_limits == (1.0, 0.0)
    m.num_batches_tracked.fill_(22500)
    assert m.current_limits == pytest.approx((2.0, 4.375))


def test_forward_uses_and_advances_the_counter():
    """The schedule is read from num_batches_tracked, which counts training forwards only."""
    m = BRN(C, rmax=3.0, dmax=1.0, warmup_iters=10, rmax_iters=30, dmax_iters=20).double()
    x = _batch(0, scales=[50.0] * C, offsets=[0.0] * C)  # σ_B/σ ≫ rmax in every channel
    with torch.no_grad():
        m.num_batches_tracked.fill_(20)  # r_max(20) = 2
        y = m(x)
    assert int(m.num_batches_tracked) == 21
    r = y.std(dim=(0, 2, 3), unbiased=False)
    torch.testing.assert_close(r, torch.full((C, ), 2.0, dtype=torch.float64), rtol=1e-6, atol=0)
    m.eval()
    m(x)
    assert int(m.num_batches_tracked) == 21


# ---------------------------------------------------------------- state
def test_state_dict_round_trip_continues_exactly():
    kwargs = dict(rmax=3.0, dmax=1.0, warmup_iters=1, rmax_iters=5, dmax_iters=4)
    a = BRN(C, **kwargs).double()
    _randomise_affine(a)
    for step in range(3):
        a(_batch(step))
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = BRN(C, **kwargs).double()
    b.load_state_dict(torch.load(buf, weights_only=True), strict=True)
    fresh = BRN(C, **kwargs).double()
    _randomise_affine(fresh)
    assert int(b.num_batches_tracked) == 3
    for step in range(3, 7):
        x = _batch(step)
        ya, yb, yf = a(x), b(x), fresh(x)
        assert torch.equal(ya, yb)
        assert not torch.allclose(ya, yf)  # without the restored state the result differs
        for name in ('running_mean', 'running_var', 'num_batches_tracked'):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


def test_batchnorm_checkpoint_loads_strictly():
    bn = nn.BatchNorm2d(C).double()
    _randomise_affine(bn)
    for step in range(3):
        bn(_batch(step))
    brn = BRN(C).double()
    assert set(brn.state_dict()) == set(bn.state_dict())
    result = brn.load_state_dict(bn.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert int(brn.num_batches_tracked) == 3
    bn.eval(), brn.eval()
    x = _batch(9)
    assert torch.equal(brn(x), bn(x))

    # an old (version 1) BN checkpoint without num_batches_tracked also loads strictly
    old = {k: v for k, v in bn.state_dict().items() if k != 'num_batches_tracked'}
    old = type(bn.state_dict())(old)
    old._metadata = {'': {'version': 1}}
    brn = BRN(C).double()
    brn.load_state_dict(old, strict=True)
    assert int(brn.num_batches_tracked) == 0


# ---------------------------------------------------------------- precision and layout
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_low_precision_input_computes_in_float32(dtype):
    m = BRN(C, rmax=2.0, dmax=0.5, warmup_iters=0, rmax_iters=1, dmax_iters=1)
    ref = copy.deepcopy(m)
    for step in range(3):
        x = _batch(step, dtype=dtype).requires_grad_()
        x_ref = x.detach().float().requires_grad_()
        y, y_ref = m(x), ref(x_ref)
        assert y.dtype == dtype
        assert torch.equal(y, y_ref.to(dtype))
        (y.float() ** 2).sum().backward()
        (y_ref.to(dtype).float() ** 2).sum().backward()
        assert x.grad.dtype == dtype and torch.isfinite(x.grad).all()
        assert m.running_var.dtype == m.weight.grad.dtype == torch.float32
        assert torch.equal(m.running_mean, ref.running_mean)
        assert torch.equal(m.running_var, ref.running_var)
        torch.testing.assert_close(m.weight.grad, ref.weight.grad, rtol=2e-2, atol=1e-2)
        m.zero_grad(), ref.zero_grad()


def test_autocast_conv_brn_bfloat16():
    conv = nn.Conv2d(3, C, 3, padding=1)
    m = BRN(C, warmup_iters=0, rmax_iters=1, dmax_iters=1)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            y = m(conv(x))
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
    assert torch.isfinite(conv.weight.grad).all() and m.running_mean.dtype == torch.float32


def test_channels_last_output_and_gradients():
    a = BRN(C, rmax=2.0, dmax=0.5, warmup_iters=0, rmax_iters=1, dmax_iters=1).double()
    b = copy.deepcopy(a)
    for step in range(3):
        x = _batch(step)
        x1 = x.clone().requires_grad_()
        x2 = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        y1, y2 = a(x1), b(x2)
        assert y2.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(y1, y2, rtol=1e-12, atol=1e-12)
        g = _batch(30 + step)
        (y1 * g).sum().backward()
        (y2 * g).sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.weight.grad, b.weight.grad, rtol=1e-10, atol=1e-12)


def test_empty_batch_is_not_counted():
    m = BRN(C)
    y = m(torch.zeros(0, C, 4, 4))
    assert y.shape == (0, C, 4, 4) and int(m.num_batches_tracked) == 0


# ---------------------------------------------------------------- mmcv / mmdet
def test_build_norm_layer_and_resnet18():
    from mmcv.cnn import build_norm_layer, fuse_conv_bn
    from mmdet.models.backbones import ResNet

    name, layer = build_norm_layer(dict(type='BRN'), 8)
    assert name == 'bn' and type(layer) is BRN and layer.eps == 1e-5
    name, layer = build_norm_layer(dict(type='BRN', rmax=2.0, warmup_iters=7, requires_grad=False), 8,
                                   postfix=1)
    assert name == 'bn1' and layer.rmax == 2.0 and layer.warmup_iters == 7
    assert not layer.weight.requires_grad

    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    # mmdet's default norm_eval=True keeps every norm in eval mode (BN with running stats) in train()
    frozen = ResNet(depth=18, norm_cfg=dict(type='BRN'), init_cfg=None)
    frozen.train()
    sum(o.mean() for o in frozen(x)).backward()
    assert all(type(m) is BRN and int(m.num_batches_tracked) == 0 and not m.training
               for m in frozen.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))

    model = ResNet(depth=18, norm_cfg=dict(type='BRN', warmup_iters=0, rmax_iters=1, dmax_iters=1),
                   norm_eval=False, init_cfg=None)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert len(norms) == 20 and all(type(m) is BRN for m in norms)
    assert isinstance(model.bn1, BRN) and isinstance(model.layer1[0].bn2, BRN)
    model.train()
    for _ in range(2):
        outs = model(x)
        sum(o.mean() for o in outs).backward()
    assert len(outs) == 4
    assert all(int(m.num_batches_tracked) == 2 for m in norms)
    assert torch.isfinite(model.conv1.weight.grad).all() and model.conv1.weight.grad.abs().sum() > 0
    assert torch.isfinite(model.layer4[1].bn2.weight.grad).all()

    model.eval()
    with torch.no_grad():
        expected = model(x)
        fused = fuse_conv_bn(copy.deepcopy(model))
        assert not any(isinstance(m, BRN) for m in fused.modules())
        for a, b in zip(expected, fused(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize('kwargs, error, words', [
    (dict(rmax=0.5), ValueError, 'rmax'),
    (dict(rmax=float('inf')), ValueError, 'rmax'),
    (dict(rmax='3'), ValueError, 'rmax'),
    (dict(dmax=-1.0), ValueError, 'dmax'),
    (dict(dmax=float('nan')), ValueError, 'dmax'),
    (dict(warmup_iters=-1), ValueError, 'warmup_iters'),
    (dict(warmup_iters=2.5), ValueError, 'warmup_iters'),
    (dict(rmax_iters=0, warmup_iters=0), ValueError, 'rmax_iters'),
    (dict(rmax_iters=1000), ValueError, 'rmax_iters'),       # < warmup_iters=5000
    (dict(dmax_iters=True), ValueError, 'dmax_iters'),
    (dict(dmax_iters=4999), ValueError, 'dmax_iters'),
    (dict(eps=0), ValueError, 'eps'),
    (dict(momentum=1.5), ValueError, 'momentum'),
    (dict(track_running_stats=False), ValueError, 'track_running_stats'),
    (dict(r_max=3.0), TypeError, 'r_max'),
    (dict(rmax_iter=3, foo=1), TypeError, "['foo', 'rmax_iter']"),
])
def test_bad_arguments(kwargs, error, words):
    with pytest.raises(error, match=words.replace('[', r'\[').replace(']', r'\]')):
        BRN(C, **kwargs)


def test_bad_arguments_through_build_norm_layer():
    from mmcv.cnn import build_norm_layer
    with pytest.raises(TypeError, match='window'):
        build_norm_layer(dict(type='BRN', window=4), 8)
    with pytest.raises(ValueError, match='dmax'):
        build_norm_layer(dict(type='BRN', dmax=-2), 8)


@pytest.mark.parametrize('shape', [(2, C), (2, C, 5), (1, 2, C, 4, 4)])
def test_non_4d_input(shape):
    m = BRN(C)
    for mode in (m.train, m.eval):
        mode()
        with pytest.raises(ValueError, match=r'4D.*' + str(tuple(shape)).replace('(', r'\(').replace(
                ')', r'\)')):
            m(torch.randn(shape))


def test_dtype_mismatch_and_single_value_batch():
    m = BRN(C)
    with pytest.raises(TypeError, match='dtype'):
        m(torch.randn(2, C, 3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match='more than 1 value'):
        m(torch.randn(1, C, 1, 1))
