"""CrossIterationBatchNorm2d as a module: BN equivalence, oracle statistics, state, semantics, errors."""
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.models import BindStatus, CrossIterationBatchNorm2d as CBN, iteration_clock
from cbn_mmdet.models.cbn import HISTORY_STATE_KEYS

torch.set_default_dtype(torch.float32)


def _batches(n, shape=(2, 3, 6, 5), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, dtype=dtype, generator=gen) + 0.5 for _ in range(n)]


def _window_stats(norm):
    """μ̄ and biased σ̄² of the last training forward, read back from momentum-1 running stats."""
    return norm.running_mean.clone(), norm.running_var.clone()


# ---------------------------------------------------------------- window=1 and empty history are BN
@pytest.mark.parametrize('make', [lambda: CBN(6, window=1), lambda: CBN(6, window=4)])
def test_equals_batchnorm_train_and_eval(make):
    """window=1, and any window before history exists / during burn-in, is nn.BatchNorm2d."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 6, 3, padding=1, bias=False)
    conv_ref = copy.deepcopy(conv)
    cbn, bn = make(), nn.BatchNorm2d(6)
    with torch.no_grad():
        cbn.weight.uniform_(0.5, 1.5)
        cbn.bias.uniform_(-0.5, 0.5)
    bn.load_state_dict(cbn.state_dict())
    if cbn.window > 1:
        cbn.active_window = 1  # burn-in
    for step, x in enumerate(_batches(3, dtype=torch.float32)):
        if step == 1 and cbn.window > 1:
            cbn.active_window = cbn.window
            cbn.reset_history()  # first CBN iteration: no history yet
        y, y_ref = cbn(conv(x)), bn(conv_ref(x))
        torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-6)
        g = torch.randn_like(y)
        (y * g).sum().backward()
        (y_ref * g).sum().backward()
        torch.testing.assert_close(cbn.weight.grad, bn.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cbn.bias.grad, bn.bias.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(conv.weight.grad, conv_ref.weight.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(cbn.running_mean, bn.running_mean, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(cbn.running_var, bn.running_var, rtol=1e-6, atol=1e-6)
        for m in (conv, conv_ref, cbn, bn):
            m.zero_grad()
        if cbn.window > 1 and step >= 1:
            cbn.reset_history()
    cbn.eval(), bn.eval()
    bn.load_state_dict(cbn.state_dict(), strict=False)  # eval is BN's own kernel: bit-exact
    x = conv(_batches(1, seed=5, dtype=torch.float32)[0])
    torch.testing.assert_close(cbn(x), bn(x), rtol=0, atol=0)


# ---------------------------------------------------------------- oracle tests
def _run_changing_conv(window, compensate, step_size, iters=6, groups=1, stride=1, seed=0):
    """Feed fixed batches through a conv whose weights move by step_size each iteration.

    Returns the CBN window statistics at the last iteration and the oracle: the last ``window``
    batches recomputed with the current weights and pooled.
    """
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=1, groups=groups, bias=True).double()
    direction = torch.randn(conv.weight.shape, dtype=torch.float64, generator=gen)
    norm = CBN(6, window=window, compensate=compensate, momentum=1.0).double()
    inputs = _batches(iters, shape=(2, 4, 7, 6), seed=seed + 1)
    for x in inputs:
        norm(conv(x))
        with torch.no_grad():
            conv.weight.add_(step_size * direction)
            conv.bias.add_(step_size)
        iteration_clock.next_iteration()
    with torch.no_grad():
        conv.weight.sub_(step_size * direction)
        conv.bias.sub_(step_size)
    # the last forward ran with the current weights; the oracle recomputes its window with them
    with torch.no_grad():
        pooled = torch.cat([conv(x) for x in inputs[-window:]])
    mean = pooled.mean((0, 2, 3))
    var = pooled.var((0, 2, 3), correction=0)
    n = pooled.shape[0] * pooled.shape[2] * pooled.shape[3]
    got_mean, got_var = _window_stats(norm)
    return got_mean, got_var * (n - 1) / n, mean, var


@pytest.mark.parametrize('groups,stride', [(1, 1), (2, 2)])
def test_oracle_mean_exact_variance_second_order(groups, stride):
    """Only the bound conv changes: window μ̄ is exact, σ̄² error O(Δθ²), Naive CBN much worse."""
    errors = {}
    for step in (2e-3, 1e-3):
        m, v, m_ref, v_ref = _run_changing_conv(4, True, step, groups=groups, stride=stride)
        torch.testing.assert_close(m, m_ref, rtol=1e-9, atol=1e-9)
        errors[step] = (v - v_ref).abs().max()
        nm, nv, _, _ = _run_changing_conv(4, False, step, groups=groups, stride=stride)
        naive_mean_error = (nm - m_ref).abs().max()
        naive_var_error = (nv - v_ref).abs().max()
        assert naive_mean_error > 1e3 * (m - m_ref).abs().max().clamp_min(1e-15)
        assert errors[step] < 0.1 * naive_var_error
    assert 3.0 < errors[2e-3] / errors[1e-3] < 5.0  # second order


def test_frozen_conv_window_equals_bn_over_concatenated_batches():
    conv = nn.Conv2d(3, 5, 3, padding=1).double().requires_grad_(False)
    norm = CBN(5, window=3, momentum=1.0).double()
    inputs = _batches(5, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        for x in inputs:
            norm(conv(x).requires_grad_())  # a leaf: nothing upstream is trainable
            iteration_clock.next_iteration()
    assert norm.last_bind_status == BindStatus.FROZEN_CONV
    bn = nn.BatchNorm2d(5, momentum=1.0).double()
    with torch.no_grad():
        bn(torch.cat([conv(x) for x in inputs[-3:]]))
    torch.testing.assert_close(norm.running_mean, bn.running_mean)
    torch.testing.assert_close(norm.running_var, bn.running_var)


def test_frozen_conv_weights_are_detected_and_exact():
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    conv.weight.requires_grad_(False)
    conv.bias.requires_grad_(False)
    norm = CBN(5, window=3, momentum=1.0).double()
    inputs = _batches(4, seed=4)
    with pytest.warns(UserWarning, match='frozen'):
        for x in inputs:
            y = norm(conv(x.requires_grad_()))
            iteration_clock.next_iteration()
    assert norm.last_bind_status == BindStatus.FROZEN_CONV
    bn = nn.BatchNorm2d(5, momentum=1.0).double().train()
    with torch.no_grad():
        bn(torch.cat([conv(x) for x in inputs[-3:]]))
    torch.testing.assert_close(norm.running_mean, bn.running_mean)
    torch.testing.assert_close(norm.running_var, bn.running_var)


# ---------------------------------------------------------------- plain PyTorch loop, state dict
def _model(window=4, **kw):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), CBN(8, window=window, **kw),
                         nn.ReLU(inplace=True), nn.Conv2d(8, 8, 3, stride=2, bias=False),
                         CBN(8, window=window, **kw), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 2))


def _train(model, opt, batches):
    losses = []
    for x in batches:
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return torch.stack(losses)


def test_plain_pytorch_loop_binds_every_layer_and_fills_window():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, _batches(6, dtype=torch.float32))
    norms = [m for m in model.modules() if isinstance(m, CBN)]
    assert [m.last_bind_status for m in norms] == [BindStatus.CONV] * 2
    assert [m.history_length for m in norms] == [3, 3]
    assert all(float(e.compensable) == 1 for m in norms for e in m.history.entries()
               if float(e.count) > 0)


def test_state_dict_round_trip_continues_exactly():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(8, dtype=torch.float32)
    _train(model, opt, batches[:4])
    buf = io.BytesIO()
    torch.save({'model': model.state_dict(), 'opt': opt.state_dict()}, buf)
    expected = _train(model, opt, batches[4:])

    resumed = _model()
    resumed[0].weight.data.mul_(3)  # make sure the load is what matters
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    assert resumed.load_state_dict(ckpt['model'], strict=True)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(ckpt['opt'])
    got = _train(resumed, opt2, batches[4:])
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_state_dict_without_history_resumes_differently():
    """Guard for the test above: dropping the history changes the continuation."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = _batches(8, dtype=torch.float32)
    _train(model, opt, batches[:4])
    state = {k: v.clone() for k, v in model.state_dict().items() if 'history' not in k}
    opt_state = copy.deepcopy(opt.state_dict())
    expected = _train(model, opt, batches[4:])
    resumed = _model()
    resumed.load_state_dict(state, strict=True)
    opt2 = torch.optim.SGD(resumed.parameters(), lr=0.05, momentum=0.9)
    opt2.load_state_dict(opt_state)
    assert not torch.equal(_train(resumed, opt2, batches[4:]), expected)


def test_bn_checkpoint_loads_strictly_without_warnings():
    bn_model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
    bn_model[1].running_mean.uniform_()
    cbn_model = nn.Sequential(nn.Conv2d(3, 8, 3), CBN(8))
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        result = cbn_model.load_state_dict(bn_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert cbn_model[1].history_length == 0 and cbn_model[1].history.index() is None
    torch.testing.assert_close(cbn_model[1].running_mean, bn_model[1].running_mean)
    assert set(CBN(8).state_dict()) == set(nn.BatchNorm2d(8).state_dict())


def test_checkpoint_with_other_window_keeps_newest_history():
    model = _model(window=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, _batches(5, dtype=torch.float32))
    small = _model(window=2)
    small.load_state_dict(model.state_dict())
    src, dst = model[1], small[1]
    assert dst.history_length == 1
    newest_src, newest_dst = src.history.entries()[0], dst.history.entries()[0]
    torch.testing.assert_close(newest_dst.mean, newest_src.mean)
    torch.testing.assert_close(newest_dst.var_grad, newest_src.var_grad)


def test_to_moves_every_history_tensor_and_keeps_its_values():
    """.double() widens every history tensor keeping its values, .half() never narrows it below
    float32, .to(device) moves all of it (the meta device stands in for another device)."""
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches(3, dtype=torch.float32))
    names = [k for k in HISTORY_STATE_KEYS if k != 'history_index']
    saved = {k: model[1].history.get(k).clone() for k in names}  # every slot of every tensor
    slots, index = model[1].history.slots_newest_first(), model[1].history.index().clone()
    newest_first = [e.mean.clone() for e in model[1].history.entries()]

    wide = copy.deepcopy(model).double()
    for name, value in saved.items():
        moved = wide[1].history.get(name)
        assert moved.dtype == torch.float64, name
        torch.testing.assert_close(moved, value.double(), rtol=0, atol=0, msg=name)
        assert torch.equal(wide[1].state_dict()[name], moved), name
    assert torch.equal(wide[1].history.index(), index)
    assert wide[1].history.index().dtype == torch.long
    assert len(wide[1].history.entries()) == len(newest_first)
    for moved, value in zip(wide[1].history.entries(), newest_first):  # same entries, same order
        torch.testing.assert_close(moved.mean, value.double(), rtol=0, atol=0)
    y = wide(_batches(1, seed=15)[0])  # and it keeps training in float64
    assert torch.isfinite(y).all() and wide[1].history_length == 3

    half = copy.deepcopy(model).half()
    for name, value in saved.items():
        assert half[1].history.get(name).dtype == torch.float32, name
        torch.testing.assert_close(half[1].history.get(name), value, rtol=0, atol=0, msg=name)

    meta = copy.deepcopy(model).to('meta')
    for name in names:
        assert meta[1].history.get(name).device.type == 'meta', name
    # slot positions: a meta cursor tensor cannot be read back to compare it
    assert meta[1].history.index().device.type == 'meta'
    assert meta[1].history.slots_newest_first() == slots


# ---------------------------------------------------------------- iteration semantics
def test_several_calls_in_one_iteration_are_pooled():
    """A module called on a and b before a step records one entry equal to cat(a, b)."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    a, b, c = _batches(3, seed=7)

    def run(split):
        norm = CBN(5, window=2, momentum=1.0).double()
        if split:
            norm(conv(a))
            norm(conv(b))
        else:
            norm(conv(torch.cat([a, b])))
        assert norm.history_length == 1 and norm.history_open
        iteration_clock.next_iteration()
        with torch.no_grad():
            conv.weight.mul_(1.01)
        norm(conv(c))
        with torch.no_grad():
            conv.weight.div_(1.01)
        assert norm.history_length == 1
        return _window_stats(norm)

    split, whole = run(True), run(False)
    torch.testing.assert_close(split[0], whole[0])
    torch.testing.assert_close(split[1], whole[1])


def _full_window3():
    """A conv + CBN(window=3) trained 3 iterations: the window is full."""
    conv = nn.Conv2d(3, 5, 3, padding=1).double()
    norm = CBN(5, window=3).double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.2)
    for x in _batches(3, seed=11):
        norm(conv(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return conv, norm


def test_later_calls_of_an_iteration_see_the_whole_window():
    """The first call overwrites the oldest entry (window - 1 slots), yet a second call of the same
    iteration normalises with all window - 1 past iterations, compensated to the same weights."""
    conv, norm = _full_window3()
    a, b = _batches(2, seed=12)
    fresh = copy.deepcopy(norm)  # the layer before this iteration: b alone as the first call
    expected = fresh(conv(b))
    assert fresh.past_window()['valid'].sum() == 2
    norm(conv(a))
    got = norm(conv(b))
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(norm.history.index(), fresh.history.index()) and norm.history_length == 2


def test_weights_changed_within_an_iteration_warn_and_drop_oldest():
    conv, norm = _full_window3()
    a, b = _batches(2, seed=12)
    norm(conv(a))
    with torch.no_grad():
        conv.weight.mul_(1.1)
    newest_past = norm.history.entries()[1].mean.clone()  # entries()[0] is the first call's
    with pytest.warns(UserWarning, match='between two calls of one iteration'):
        norm(conv(b))
    window = norm.past_window()
    valid = window['valid']
    assert valid.sum() == 1  # the oldest one is dropped, the newest past one kept:
    torch.testing.assert_close(window['mean'][valid > 0], newest_past[None], rtol=0, atol=0)


def test_version3_checkpoint_history_is_repacked_by_age():
    """Checkpoints of the first layout (window slots, pending entry counted apart) still resume."""
    norm = CBN(2, window=3)
    means = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])  # slot i holds mean i
    state = dict(norm.state_dict())
    state.update(history_mean=means, history_var=torch.ones(3, 2), history_count=torch.ones(3) * 8,
                 history_mean_ref=torch.zeros(3, 2), history_var_ref=torch.zeros(3, 2),
                 history_compensable=torch.zeros(3),
                 history_index=torch.tensor([1, 2, 1]))  # head slot 1 open, 2 past: slots 0, 2
    state = type(norm.state_dict())(state)
    state._metadata = {'': {'version': 3}}
    norm.load_state_dict(state)
    # window 3 keeps 2 entries: the open one (slot 1) and the newest past one (slot 0)
    assert norm.history_length == 2 and norm.history_open
    assert [e.mean.tolist() for e in norm.history.entries()] == [[1.0, 1.0], [0.0, 0.0]]


def test_subsampled_mode_records_the_estimator_on_its_positions():
    """statistics_gradients='subsampled': ∂var/∂θ over every 2nd output row/column (autograd ref.)."""
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=False).double()
    norm = CBN(5, window=2, statistics_gradients='subsampled').double()
    x = _batches(1, shape=(2, 3, 13, 11), seed=5)[0]
    out = conv(x)
    norm(out)
    w = conv.weight.detach().clone().requires_grad_(True)
    sub = F.conv2d(x, w, None, 2, 1)[:, :, ::2, ::2]
    mean = out.detach().mean((0, 2, 3)).view(1, -1, 1, 1)
    ref, = torch.autograd.grad((sub - mean).square().mean((0, 2, 3)).sum(), w)
    torch.testing.assert_close(norm.history.entries()[0].var_grad, ref)
    with pytest.raises(ValueError, match='subsample'):
        CBN(5, statistics_gradients='subsampled', subsample=1)


def _shadow_run(**options):
    """A CBN layer and a shadow with ``options`` on the same conv outputs; only the first trains."""
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, padding=1, bias=False)
    main, shadow = CBN(16, window=4), CBN(16, window=4, **options)
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    target = torch.randn(4, 16, 10, 10)
    for x in _batches(6, shape=(4, 8, 10, 10), dtype=torch.float32):
        out = conv(x)
        y = main(out)
        shadow(out)
        (y * target).mean().backward()
        opt.step()
        opt.zero_grad()
    ref, got = main.past_window(), shadow.past_window()
    assert torch.equal(ref['valid'], got['valid']) and ref['valid'].sum() == 3
    correction = ref['var_compensated'] - ref['var']
    assert correction.abs().max() > 1e-2 * ref['var'].mean()  # the weights moved enough to matter
    return shadow, (got['var_compensated'] - ref['var_compensated']).abs().max() / \
        correction.abs().max()


def test_bfloat16_history_changes_the_correction_by_rounding_only():
    shadow, rel_error = _shadow_run(history_dtype='bfloat16')
    assert shadow.history.get('history_var_grad').dtype == torch.bfloat16
    assert shadow.history.get('history_var_ref').dtype == torch.float32
    # bfloat16 keeps 8 bits (relative rounding 2^-9 per value); docs/cost.md: 0.1-1 % of the correction
    assert 0 < rel_error < 0.01


def test_gradient_accumulation_advances_once_per_step():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in _batches(3, dtype=torch.float32):
        for micro in x.split(1):
            model(micro).sum().backward()
        opt.step()
        opt.zero_grad()
    assert model[1].history_length == 3


def test_no_history_update_in_eval_or_no_grad():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, _batches(2, dtype=torch.float32))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    model(_batches(1, seed=3, dtype=torch.float32)[0])
    model.train()
    with torch.no_grad():
        model(_batches(1, seed=4, dtype=torch.float32)[0])
    # no graph: the conv bound by the last recorded forward, and no state changed (no history, no
    # running statistics: a checkpoint's recomputation updates them)
    assert model[1].last_bind_status == BindStatus.CONV
    after = model.state_dict()
    for k in before:
        if k.endswith('history_index'):  # the iteration's entry is closed: the optimizer stepped
            assert torch.equal(before[k][:2], after[k][:2])
            continue
        assert torch.equal(before[k], after[k]), k


# ---------------------------------------------------------------- fallbacks
def test_input_not_from_conv_falls_back_to_bn_and_warns_once():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    norm, bn = CBN(4, window=4), nn.BatchNorm2d(4)
    xs = _batches(3, dtype=torch.float32)
    with pytest.warns(UserWarning, match='not the output of a trainable conv') as record:
        for x in xs:
            h = conv(x)
            y = norm(h + 1.0)  # after an add
            torch.testing.assert_close(y, bn(h + 1.0))
            iteration_clock.next_iteration()
    assert len([w for w in record if 'CBN' in str(w.message)]) == 1
    assert norm.last_bind_status == BindStatus.NOT_CONV and norm.history.index() is None


def test_naive_fallback_uses_window():
    """fallback='naive': the window of the inputs as recorded (the conv moved meanwhile, nothing is
    compensated): output, running mean and running variance of BN over the window's batches."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = CBN(4, window=3, fallback='naive', momentum=1.0).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    xs = _batches(4, seed=2)
    seen = []
    with pytest.warns(UserWarning, match='naive'):
        for x in xs:
            h = F.relu(conv(x))
            y = norm(h)
            seen.append(h.detach())
            with torch.no_grad():
                conv.weight.mul_(1.2)  # compensation would move the past statistics
            iteration_clock.next_iteration()
    assert norm.last_bind_status == BindStatus.NOT_CONV and norm.history_length == 2
    bn = nn.BatchNorm2d(4, momentum=1.0).double()
    bn.load_state_dict(norm.state_dict(), strict=False)
    with torch.no_grad():
        ref = bn(torch.cat(seen[-3:]))[-len(xs[-1]):]  # the last batch, normalised by the window
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- precision and layout
def test_bfloat16_autocast_keeps_float32_statistics():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x in _batches(3, dtype=torch.float32):
        with torch.autocast('cpu', dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        opt.step()
        opt.zero_grad()
    norm = model[1]
    assert norm.last_bind_status == BindStatus.CONV
    var_grad = norm.history.get('history_var_grad')  # the whole ring
    assert var_grad.dtype == torch.float32 and norm.running_var.dtype == torch.float32
    assert norm.history_length == 3 and torch.isfinite(var_grad).all()


@pytest.mark.parametrize('shape', [(2, 3, 6, 5), (2, 3, 48, 48)],
                         ids=['unfolded-product', 'convolution-product'])
def test_channels_last_matches_contiguous(shape):
    """Also for convs large enough that ∂var/∂θ is a weight-gradient convolution, whose result
    then comes in the channels-last layout."""
    ref, cl = _model(), _model()
    cl.to(memory_format=torch.channels_last)
    for x in _batches(3, shape=shape, dtype=torch.float32):
        a = ref(x)
        b = cl(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        a.sum().backward(), b.sum().backward()
        iteration_clock.next_iteration()
    torch.testing.assert_close(cl[0].weight.grad, ref[0].weight.grad, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize('kwargs,match', [
    (dict(window=0), 'window'), (dict(window=2.5), 'window'), (dict(window=True), 'window'),
    (dict(window='4'), 'window'), (dict(momentum=1.5), 'momentum'), (dict(eps=0), 'eps'),
    (dict(fallback='zero'), 'fallback'), (dict(running_stats='ema'), 'running_stats'),
    (dict(statistics_gradients='fd'), 'statistics_gradients'), (dict(compensate='yes'), 'compensate'),
])
def test_invalid_options_name_the_setting(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CBN(4, **kwargs)


def test_unknown_option_is_named():
    with pytest.raises(TypeError, match='windw'):
        CBN(4, windw=4)


def test_active_window_bounds():
    norm = CBN(4, window=4)
    with pytest.raises(ValueError, match='active_window'):
        norm.active_window = 5
    with pytest.raises(ValueError, match='active_window'):
        norm.active_window = 0


def test_bad_shapes():
    norm = CBN(4)
    with pytest.raises(ValueError, match='4D'):
        norm(torch.randn(2, 4, 5))
    conv = nn.Conv2d(3, 4, 1)
    with pytest.raises(ValueError, match='more than 1 value per channel'):
        norm(conv(torch.randn(1, 3, 1, 1)))


def test_non_finite_statistics_never_enter_history_or_running_stats():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, _batches(2, dtype=torch.float32))
    norm = model[1]
    before = {k: v.clone() for k, v in norm.state_dict().items()}
    x = _batches(1, seed=9, dtype=torch.float32)[0]
    x[0, 0, 0, 0] = float('nan')
    model(x)
    for k, v in norm.state_dict().items():
        assert torch.isfinite(v.float()).all(), k
    torch.testing.assert_close(norm.running_mean, before['running_mean'])
    torch.testing.assert_close(norm.running_var, before['running_var'])
    assert norm.history.entries()[0].count == 0  # the entry holds no values


def test_empty_input_does_not_update():
    norm = CBN(4, window=2)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    y = norm(conv(torch.randn(0, 3, 5, 5)))
    assert y.shape == (0, 4, 5, 5)
    assert norm.history.index() is None and int(norm.num_batches_tracked) == 0


def _algorithm1_reference(inputs, weights, window, stride=1, padding=1):
    """Algorithm 1 literally, in float64: ν-form Taylor steps with autograd gradients and stored θ."""
    records = []  # (μ, ν, dμ/dθ, dν/dθ, θ) per iteration
    for x_in, w in zip(inputs, weights):
        w_ = w.clone().requires_grad_(True)
        out = F.conv2d(x_in, w_, None, stride, padding)
        mu, nu = out.mean((0, 2, 3)), (out * out).mean((0, 2, 3))
        d_mu, = torch.autograd.grad(mu.sum(), w_, retain_graph=True)   # row j = dμ_j/dθ_j (Eq. 15)
        d_nu, = torch.autograd.grad(nu.sum(), w_)
        records.append((mu.detach(), nu.detach(), d_mu, d_nu, w.clone()))
    theta_t = weights[-1]
    mus, nus = [], []
    for mu, nu, d_mu, d_nu, theta in records[-window:]:
        delta = theta_t - theta
        mu_c = mu + (d_mu * delta).flatten(1).sum(1)           # Eq. 7
        nu_c = nu + (d_nu * delta).flatten(1).sum(1)           # Eq. 8
        mus.append(mu_c)
        nus.append(torch.maximum(nu_c, mu_c * mu_c))           # Eq. 10 (the current one unchanged)
    mean = torch.stack(mus).mean(0)                            # Eq. 9
    var = torch.stack(nus).mean(0) - mean * mean               # Eq. 11
    return mean, var


@pytest.mark.parametrize('step', [1e-3, 3e-1])
def test_matches_algorithm_1_literally(step):
    """The layer's window statistics equal a literal Algorithm 1 (small and clamp-inducing steps)."""
    gen = torch.Generator().manual_seed(11)
    conv = nn.Conv2d(4, 6, 3, padding=1, bias=False).double()
    norm = CBN(6, window=4, momentum=1.0).double()
    inputs = _batches(6, shape=(2, 4, 5, 5), seed=12)
    weights = []
    for x in inputs:
        weights.append(conv.weight.detach().clone())
        norm(conv(x))
        with torch.no_grad():
            conv.weight.add_(step * torch.randn(conv.weight.shape, dtype=torch.float64, generator=gen))
        iteration_clock.next_iteration()
    mean, var = _algorithm1_reference(inputs, weights, 4)
    n = 4 * 2 * 5 * 5
    torch.testing.assert_close(norm.running_mean, mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(norm.running_var * (n - 1) / n, var, rtol=1e-8, atol=1e-10)


def test_history_is_state_but_not_a_buffer():
    """DDP broadcast_buffers / SyncBuffersHook act on buffers(): the per-GPU history is not one."""
    model = _model()
    _train(model, torch.optim.SGD(model.parameters(), lr=0.05), _batches(3, dtype=torch.float32))
    norm = model[1]
    buffer_names = {name for name, _ in norm.named_buffers()}
    assert buffer_names == {'running_mean', 'running_var', 'num_batches_tracked'}
    assert 'history_var_grad' in norm.state_dict()
    clone = copy.deepcopy(model)
    torch.testing.assert_close(clone[1].history.get('history_var_grad'),
                               norm.history.get('history_var_grad'))


def test_forced_weight_jump_keeps_statistics_valid():
    """A checkpoint with very different weights (or an lr spike): clamp holds, variance >= 0, finite."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    _train(model, opt, _batches(4, dtype=torch.float32))
    other = _model()
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 5.0)
    state = {k: v for k, v in other.state_dict().items() if 'history' not in k and 'running' not in k}
    model.load_state_dict(state, strict=False)  # weights jump, history and running stats stay
    norm = model[1]
    assert norm.history_length == 0  # loading a state without history resets it
    _train(model, opt, _batches(3, seed=5, dtype=torch.float32))
    with torch.no_grad():
        model[0].weight.mul_(-40.0)  # a spike after history exists
    x = _batches(1, seed=6, dtype=torch.float32)[0]
    from cbn_mmdet.ops.statistics import compensate_history
    binding_weight = model[0].weight
    ring = norm.history.get  # the whole ring, as the layer compensates it
    mean, var = compensate_history(ring('history_mean'), ring('history_var'),
                                   ring('history_mean_ref'), ring('history_var_ref'),
                                   ring('history_patch_mean'), ring('history_var_grad'),
                                   ring('history_compensable'), binding_weight, None, 1)
    assert torch.all(var >= 0) and torch.isfinite(var).all() and torch.isfinite(mean).all()
    y = model(x)
    assert torch.isfinite(y).all()
    assert torch.all(norm.running_var >= 0) and torch.isfinite(norm.running_var).all()


def test_dtype_and_device_mismatch_is_a_clear_error():
    norm = CBN(4, window=2)
    conv = nn.Conv2d(3, 4, 3).double()
    with pytest.raises(TypeError, match='dtype'):
        norm(conv(torch.randn(2, 3, 6, 6, dtype=torch.float64)))
    elsewhere = CBN(4, window=2).to('meta')  # another device than the input's
    with pytest.raises(RuntimeError, match='input is on cpu but the layer is on meta'):
        elsewhere(nn.Conv2d(3, 4, 3)(torch.randn(2, 3, 6, 6)))


def test_soak_history_is_bounded():
    """Many iterations: the history keeps a fixed size and count of tensors (guards leaks)."""
    import gc
    model = _model(window=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = _batches(1, dtype=torch.float32)[0]

    def step():
        loss = model(x).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(20):
        step()
    norm = model[1]
    sizes = {k: (tuple(v.shape), v.data_ptr()) for k, v in norm.history.tensors.items()}
    gc.collect()
    tensors_before = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    for _ in range(100):
        step()
    gc.collect()
    tensors_after = sum(1 for o in gc.get_objects() if torch.is_tensor(o))
    assert {k: (tuple(v.shape), v.data_ptr()) for k, v in norm.history.tensors.items()} == sizes
    assert tensors_after <= tensors_before + 5


def test_each_entry_counts_its_own_batch_when_the_batch_size_changes():
    """The entry's number of values follows the batch (cached per size, never a stale one)."""
    torch.manual_seed(0)
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=4)
    opt = torch.optim.SGD(conv.parameters(), lr=0.01)
    for n, size in ((2, 5), (3, 5), (2, 4)):
        norm(conv(torch.randn(n, 3, size, size))).sum().backward()
        opt.step()
        opt.zero_grad()
    assert [float(e.count) for e in norm.history.entries()] == [2 * 16, 3 * 25, 2 * 25]
