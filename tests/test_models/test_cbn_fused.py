"""The fused CPU bookkeeping ops (``cbn_mmdet/ops/csrc/cbn_cpu.cpp``) against the Python path they
replace, in float64: the same outputs, gradients, running statistics and history over several SGD
steps, for every branch the ops take (compensated or not, conv bias, groups, a non-finite batch, a
conv frozen then trainable again, cumulative momentum, batch running statistics, per-call histories,
burn-in, a window change). The Python path is itself tested against brute-force references in the
other files; the fused one runs everywhere else on CPU."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.utils.parametrize

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models import iteration_clock
from cbn_mmdet.models.cbn import cpu_has_fast_bfloat16
from cbn_mmdet.models.conv_binding import saved_tensor_hooks_accessor
from cbn_mmdet.models.window_history import WindowHistory
from cbn_mmdet.ops import fused
from op_names import OpNames

pytestmark = pytest.mark.skipif(fused.ops() is None, reason='the fused CPU ops did not build')
# the one-call step tells a checkpoint's first pass by torch >= 2.8's reader of the saved-tensor
# hooks; on older torch the Python forward calls the fused ops one by one
ONE_CALL = saved_tensor_hooks_accessor() is not None
needs_one_call = pytest.mark.skipif(not ONE_CALL, reason='the one-call step needs torch >= 2.8')


def _model(conv_bias=False, groups=1, channels=4, kernel=3, size=None, **cbn):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, channels, kernel, padding=kernel // 2, bias=conv_bias,
                                   groups=groups),
                         CBN(channels, **cbn), nn.ReLU()).double()


def _batches(steps, seed=1, size=(6, 5)):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, *size, generator=g, dtype=torch.float64) * (1 + 0.3 * i) + 0.2 * i
            for i in range(steps)]


def _train(model, xs, calls=1, events=None):
    """SGD with momentum; ``events[i]`` runs before step i (it gets the model)."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    record = []
    for i, x in enumerate(xs):
        if events and i in events:
            events[i](model)
        x = x.clone().requires_grad_(True)
        ys = [model(x * (1 + 0.1 * c)) for c in range(calls)]
        sum(y.square().mean() + y.mean() for y in ys).backward()
        record.append([y.detach() for y in ys] + [x.grad] + [p.grad.clone() for p in
                                                             model.parameters() if p.grad is not None])
        opt.step()
        opt.zero_grad()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return record, state


def _freeze(requires_grad):
    def event(model):
        model[0].weight.requires_grad_(requires_grad)
    return event


def _nan_batch(model):
    model._poison = True


SCENARIOS = {
    'compensated': (dict(), {}),
    # ∂var/∂θ by the weight-gradient convolution (its centring formed by the fused record), by the
    # input covariance of a 1×1 conv, and subsampled
    'large_input': (dict(size=(40, 36)), {}),
    'large_input_groups_bias': (dict(size=(40, 36), groups=2, conv_bias=True), {}),
    'conv_1x1': (dict(kernel=1, channels=16, size=(12, 10)), {}),
    # a 1×1 conv's product as a matrix product (few positions), and as the convolution (many)
    'conv_1x1_matmul': (dict(kernel=1), {}),
    'conv_1x1_large_input': (dict(kernel=1, size=(40, 36)), {}),
    # more values than the normalisation's loops take (torch's kernels instead)
    'large_batch': (dict(size=(100, 80)), {}),
    'subsampled': (dict(size=(40, 36), statistics_gradients='subsampled'), {}),
    'bfloat16_history': (dict(history_dtype='bfloat16'), {}),
    'bfloat16_history_large_input': (dict(size=(40, 36), history_dtype='bfloat16'), {}),
    # the product on bfloat16 operands (a small conv's stays float32: the unfolded product)
    'bfloat16_product': (dict(var_grad_dtype='bfloat16'), {}),
    'bfloat16_product_large_input': (dict(size=(40, 36), var_grad_dtype='bfloat16'), {}),
    'bfloat16_product_1x1': (dict(kernel=1, var_grad_dtype='bfloat16'), {}),
    'naive': (dict(compensate=False), {}),
    'conv_bias': (dict(conv_bias=True), {}),
    'groups': (dict(groups=2), {}),
    'momentum_none': (dict(momentum=None), {}),
    'batch_running_stats': (dict(running_stats='batch'), {}),
    'no_running_stats': (dict(track_running_stats=False), {}),
    'no_affine': (dict(affine=False), {}),
    'window_2': (dict(window=2), {}),
    'window_8': (dict(window=8), {}),
    'frozen_then_trainable': (dict(), {2: _freeze(False), 4: _freeze(True)}),
    'burn_in': (dict(), {0: lambda m: setattr(m[1], 'active_window', 1),
                         2: lambda m: setattr(m[1], 'active_window', 2),
                         4: lambda m: setattr(m[1], 'active_window', 4)}),
    'window_change': (dict(), {4: lambda m: m[1].set_window(3)}),
    # a full ring of which the window uses fewer entries
    'shorter_active_window': (dict(), {4: lambda m: setattr(m[1], 'active_window', 2),
                                       6: lambda m: setattr(m[1], 'active_window', 3)}),
}


def _compare(a, b, tol=1e-12):
    (rec_a, state_a), (rec_b, state_b) = a, b
    assert len(rec_a) == len(rec_b)
    for step_a, step_b in zip(rec_a, rec_b):
        assert len(step_a) == len(step_b)
        for x, y in zip(step_a, step_b):
            torch.testing.assert_close(x, y, rtol=tol, atol=tol, equal_nan=True)
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        torch.testing.assert_close(state_a[key], state_b[key], rtol=tol, atol=tol,
                                   equal_nan=True, msg=lambda m: f'{key}: {m}')


class _OneCallSteps:
    """Counts the training forwards taken by the one-call step (train_step)."""

    def __init__(self, monkeypatch):
        self.count = 0
        original = WindowHistory.recorded_in_one_call

        def counted(history, *args):
            self.count += 1
            return original(history, *args)
        monkeypatch.setattr(WindowHistory, 'recorded_in_one_call', counted)


# the scenarios whose steady state the one-call step declines (the rest of forward runs): on a
# CPU without fast bfloat16 kernels the bfloat16 product too (the Python forward warns of it)
_BFLOAT16_PRODUCT = {'bfloat16_product', 'bfloat16_product_large_input', 'bfloat16_product_1x1'}
_NOT_ONE_CALL = {'subsampled'} | (set() if cpu_has_fast_bfloat16() else _BFLOAT16_PRODUCT)


@pytest.mark.parametrize('name', sorted(SCENARIOS))
@pytest.mark.filterwarnings('ignore:CBN.4.. its conv has frozen weights')
@pytest.mark.filterwarnings("ignore:CBN.4.. var_grad_dtype='bfloat16' on a CPU without")
def test_fused_ops_equal_the_python_path(name, monkeypatch):
    options, events = SCENARIOS[name]
    xs = _batches(8, size=options.get('size') or (6, 5))
    steps = _OneCallSteps(monkeypatch)
    fused_run = _train(_model(**options), xs, events=events)
    assert (steps.count == 0) == (name in _NOT_ONE_CALL or not ONE_CALL), steps.count
    with fused.disabled():
        python_run = _train(_model(**options), xs, events=events)
    assert steps.count == 0 or name not in _NOT_ONE_CALL
    _compare(fused_run, python_run)


@needs_one_call
@pytest.mark.parametrize('name', ['compensated', 'large_input', 'large_input_groups_bias',
                                  'large_batch', 'conv_1x1', 'conv_1x1_matmul',
                                  'conv_1x1_large_input', 'naive', 'bfloat16_history',
                                  'bfloat16_product_large_input', 'bfloat16_product_1x1'])
def test_one_call_step_gives_the_bits_of_the_fused_forward(name, monkeypatch):
    """float32, no tolerance: the one-call step and the Python forward with the fused ops compute
    the same operations, so a run that switches between them (a resumed run's first step, a
    changed binding) continues exactly as one that does not."""
    if name in _NOT_ONE_CALL:
        pytest.skip('no fast bfloat16 kernels on this CPU: the one-call step declines')
    options, events = SCENARIOS[name]
    xs = [x.float() for x in _batches(6, size=options.get('size') or (6, 5))]
    steps = _OneCallSteps(monkeypatch)
    one_call = _train(_model(**options).float(), xs, events=events)
    assert steps.count == 5
    with fused.without_one_call():
        fused_forward = _train(_model(**options).float(), xs, events=events)
    assert steps.count == 5
    _compare(one_call, fused_forward, tol=0)


@needs_one_call
@pytest.mark.parametrize('name', ['large_input', 'conv_1x1_matmul', 'bfloat16_product_large_input',
                                  'bfloat16_product_1x1'])
def test_one_call_step_gives_the_bits_of_the_fused_forward_channels_last(name, monkeypatch):
    """The products' paths on channels-last convs: the one-call step and the fused forward take
    the same operands (no layout-dependent copy in one of them), so the same bits."""
    if name in _NOT_ONE_CALL:
        pytest.skip('no fast bfloat16 kernels on this CPU: the one-call step declines')
    options, events = SCENARIOS[name]
    xs = [x.float().contiguous(memory_format=torch.channels_last)
          for x in _batches(6, size=options.get('size') or (6, 5))]

    def model():
        return _model(**options).float().to(memory_format=torch.channels_last)
    steps = _OneCallSteps(monkeypatch)
    one_call = _train(model(), xs, events=events)
    assert steps.count == 5
    with fused.without_one_call():
        fused_forward = _train(model(), xs, events=events)
    assert steps.count == 5
    _compare(one_call, fused_forward, tol=0)


@needs_one_call
@pytest.mark.filterwarnings('ignore:CBN.4.. its conv has frozen weights')
def test_one_call_step_with_nothing_trainable_before_the_layer(monkeypatch):
    """Only γ and β get gradients (the input has no autograd graph): the same bits as the fused
    forward, the same values as the Python path."""
    def run():
        model = _model().float()
        model[0].requires_grad_(False)
        opt = torch.optim.SGD(model[1].parameters(), lr=0.2, momentum=0.5)
        out = []
        for x in _batches(6):
            y = model(x.float())
            (y.square().mean() + y.mean()).backward()
            out.append([y.detach(), model[1].weight.grad.clone(), model[1].bias.grad.clone()])
            opt.step()
            opt.zero_grad()
        return out, {k: v.clone() for k, v in model.state_dict().items()}
    steps = _OneCallSteps(monkeypatch)
    one_call = run()
    assert steps.count == 5
    with fused.without_one_call():
        _compare(one_call, run(), tol=0)
    with fused.disabled():
        _compare(one_call, run(), tol=1e-5)


class _Doubled(nn.Module):
    def forward(self, weight):
        return 2.0 * weight


def test_one_call_step_leaves_a_parametrized_scale_to_the_python_forward(monkeypatch):
    """γ computed by a parametrization (not a parameter of the layer): the Python forward, which
    reads it through the module, takes every step."""
    def model():
        m = _model()
        torch.nn.utils.parametrize.register_parametrization(m[1], 'weight', _Doubled())
        return m
    steps = _OneCallSteps(monkeypatch)
    xs = _batches(5)
    run = _train(model(), xs)
    assert steps.count == 0
    with fused.disabled():
        _compare(run, _train(model(), xs))


@needs_one_call
def test_one_call_step_equals_the_python_path_in_double_backward():
    """A gradient penalty (create_graph=True) through the one-call step's C++ autograd node: the
    same second-order gradients as the Python path's differentiable backward."""
    def run():
        model = _model(conv_bias=True)
        opt = torch.optim.SGD(model.parameters(), lr=0.2)
        out = []
        for x in _batches(5):
            x = x.clone().requires_grad_(True)
            y = model(x)
            (grad_x, ) = torch.autograd.grad(y.square().mean() + y.mean(), x, create_graph=True)
            (y.mean() + grad_x.square().sum()).backward()
            out.append([grad_x.detach()] + [p.grad.clone() for p in model.parameters()])
            opt.step()
            opt.zero_grad()
        return out
    one_call = run()
    with fused.disabled():
        python = run()
    for a, b in zip(one_call, python):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


def test_fused_ops_equal_the_python_path_per_call_and_pooled_calls():
    xs = _batches(6)
    for options in (dict(per_call=2), dict()):  # two calls per iteration, per call or pooled
        fused_run = _train(_model(**options), xs, calls=2)
        with fused.disabled():
            python_run = _train(_model(**options), xs, calls=2)
        _compare(fused_run, python_run)


@pytest.mark.parametrize('where', ['input', 'gradients'])
def test_fused_ops_equal_the_python_path_with_non_finite_values(where, monkeypatch):
    """A batch with a NaN (nothing of it kept) and a batch whose ∂var/∂θ overflows (kept,
    uncompensated: its reference terms are not finite), in the one-call step."""
    steps = _OneCallSteps(monkeypatch)
    xs = _batches(7)
    if where == 'input':
        xs[3] = xs[3].clone()
        xs[3][0, 0, 0, 0] = float('nan')
    else:
        xs[3] = xs[3] * 1e160  # squares overflow float64 in ∂var/∂θ, not the moments' sums
    runs = []
    for disabled in (False, True):
        with (fused.disabled() if disabled else _nothing()):
            model = _model()
            record, state = _train(model, xs)
            runs.append((record, state))
    _compare(*runs)
    assert steps.count == (6 if ONE_CALL else 0)  # every forward after the first
    state = runs[0][1]
    assert torch.isfinite(state['1.running_mean']).all()
    assert torch.isfinite(state['1.history_var_grad']).all()


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _profiled_names(model, x):
    with torch.profiler.profile() as prof:
        model(x).sum().backward()
    return {e.name for e in prof.events()}


@needs_one_call
def test_fused_ops_run_on_cpu_and_not_when_disabled():
    """The ops are what a CPU training step runs (the comparisons above compare two paths): from
    the second forward on, one call (train_step) and its C++ autograd node; without it the four
    ops and the normalisation's two; with the fused ops off, none."""
    model = _model()
    xs = _batches(4)
    _train(model, xs[:3])
    one_call = _profiled_names(model, xs[3])
    assert 'cbn_mmdet::train_step' in one_call
    assert 'torch::autograd::CppNode<cbn_mmdet::WindowNormFunction>' in one_call
    assert not {'cbn_mmdet::past_window', 'cbn_mmdet::window_step'} & one_call
    for disabled in (False, True):
        iteration_clock.next_iteration()  # (each forward the first of its iteration)
        counter = OpNames()
        with (fused.disabled() if disabled else fused.without_one_call()), counter:
            model(xs[3]).sum().backward()
        used = {n for n in counter.names if n.startswith('cbn_mmdet.')}
        assert used == (set() if disabled else {'cbn_mmdet.past_window', 'cbn_mmdet.window_step',
                                                'cbn_mmdet.record_entry',
                                                'cbn_mmdet.unfold_gradients',
                                                'cbn_mmdet.window_norm_forward',
                                                'cbn_mmdet.window_norm_backward'})


def test_fused_window_step_against_the_formulas():
    """The op alone against Eqs. 9-11 written out, with a slot outside the window and cumulative
    momentum (an independent reference, not the Python path)."""
    g = torch.Generator().manual_seed(3)
    c, t, count = 5, 3, 40.0
    bm, bv = torch.randn(c, generator=g, dtype=torch.float64), torch.rand(c, generator=g,
                                                                         dtype=torch.float64)
    pm, pv = torch.randn(c, t, generator=g, dtype=torch.float64), torch.rand(c, t, generator=g,
                                                                           dtype=torch.float64)
    valid = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    recorded = torch.zeros(2 * c + 1, t, dtype=torch.float64)
    recorded[2 * c] = torch.tensor([30.0, 50.0, 20.0])
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)
    nbt = torch.tensor(4)
    mean, var, invstd, inv_k, finite = fused.ops().window_step(
        bm, bv, count, pm, pv, valid, recorded, rm, rv, nbt, True, -1.0, True, 1e-5)
    used = [bm] + [pm[:, i] for i in (0, 2)]
    used_v = [bv] + [pv[:, i] for i in (0, 2)]
    mu = sum(used) / 3
    sigma2 = sum(v + (m - mu) ** 2 for m, v in zip(used, used_v)) / 3
    torch.testing.assert_close(mean, mu, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(var, sigma2, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(invstd, 1 / torch.sqrt(sigma2 + 1e-5), rtol=1e-14, atol=1e-14)
    assert math.isclose(float(inv_k), 1 / 3) and bool(finite) and int(nbt) == 5
    values = count + 30.0 + 20.0
    torch.testing.assert_close(rm, mu / 5, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(rv, 1 + (sigma2 * values / (values - 1) - 1) / 5, rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize('path', ['fused', 'python'])
@pytest.mark.filterwarnings('ignore:CBN.4.. its conv has frozen weights')
def test_entries_recorded_while_the_conv_was_frozen_stay_as_recorded(path):
    """An entry recorded without compensation into a slot that held gradients before is used as
    recorded once the conv trains again (its slot's old gradients would move it by θ·∂μ/∂θ)."""
    with (fused.disabled() if path == 'python' else _nothing()):
        model = _model()
        xs = _batches(5)
        _train(model, xs[:4], events={2: _freeze(False)})  # slots: step 3 over step 0's
        model[0].weight.requires_grad_(True)
        model(xs[4])
    past = model[1].past_window()
    kept = model[1].history.get('history_compensable') == 0
    assert kept.sum() == 2
    torch.testing.assert_close(past['mean_compensated'][kept], past['mean'][kept], rtol=0, atol=0)
    torch.testing.assert_close(past['var_compensated'][kept], past['var'][kept], rtol=0, atol=0)


def test_an_unknown_cbn_fused_setting_is_refused(monkeypatch):
    monkeypatch.setenv('CBN_FUSED', 'no')
    with fused.disabled():
        fused._state['tried'] = False  # ask again, inside the block that restores the state
        with pytest.raises(ValueError, match="CBN_FUSED must be '0'.*'1'.*got 'no'"):
            fused.ops()


class _Concat(nn.Module):
    """Two convs whose outputs a CBN normalises concatenated (a DenseNet-like input)."""

    def __init__(self, **cbn):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(4, 3, 3, padding=1), nn.Conv2d(4, 2, 1)
        self.norm = CBN(5, **cbn)

    def forward(self, x):
        return torch.relu(self.norm(torch.cat([self.a(x), self.b(x)], 1)))


@needs_one_call
@pytest.mark.filterwarnings('ignore:CBN')
def test_one_call_step_leaves_a_concatenation_to_compensate_to_the_python_forward():
    """concat='compensate': a concatenation of frozen convs taken naively, whose convs then train,
    is compensated slice by slice from then on, as in the Python path (the one-call step, which
    binds a single conv, does not take it over)."""
    def unfreeze(trainable):
        def event(model):
            for conv in (model.a, model.b):
                conv.requires_grad_(trainable)
        return event
    xs = _batches(8)
    events = {0: unfreeze(False), 4: unfreeze(True)}
    options = dict(concat='compensate', fallback='naive')
    run = _train(_Concat(**options).double(), xs, events=events)
    with fused.disabled():
        _compare(run, _train(_Concat(**options).double(), xs, events=events))
