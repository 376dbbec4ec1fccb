"""``per_call=N``: a layer applied N times per forward (a single-stage head, once per FPN level) keeps
one history per call, so each call is normalised with its own level's past, as N separate layers
would be (float64, exact)."""
import copy

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN


def _levels(gen, micro_batches=1):
    """Two 'FPN levels' with different statistics, per micro-batch."""
    return [[torch.randn(2, 3, 6, 6, generator=gen, dtype=torch.float64),
             3.0 * torch.randn(2, 3, 4, 4, generator=gen, dtype=torch.float64) + 2.0]
            for _ in range(micro_batches)]


def _train(norms, steps=5, micro_batches=1, seed=0):
    """A shared conv applied to both levels, then ``norms[level]`` (the same layer twice for a shared
    norm); returns the outputs of every step and the conv."""
    torch.manual_seed(seed)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    outputs = []
    for _ in range(steps):
        for levels in _levels(gen, micro_batches):
            outs = [norms[i](conv(x)) for i, x in enumerate(levels)]
            sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
                for o in outs).backward()
            outputs.append([o.detach() for o in outs])
        opt.step()
        opt.zero_grad()
    return outputs, conv


def _cbn(**kwargs):
    return CBN(4, window=3, **dict(dict(affine=False, momentum=None), **kwargs)).double()


@pytest.mark.parametrize('micro_batches', [1, 2])
def test_per_call_equals_one_layer_per_level(micro_batches):
    shared = _cbn(per_call=2)
    got, conv_got = _train([shared, shared], micro_batches=micro_batches)
    separate = [_cbn(), _cbn()]
    want, conv_want = _train(separate, micro_batches=micro_batches)
    for g, w in zip(got, want):
        for a, b in zip(g, w):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(conv_got.weight, conv_want.weight, rtol=1e-12, atol=1e-12)
    for call, layer in enumerate(separate):
        ours, theirs = shared.call_histories[call].entries(), layer.history.entries()
        assert len(ours) == len(theirs) == 2
        for a, b in zip(ours, theirs):
            torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(a.var_grad, b.var_grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('burn_in', [False, True])
def test_per_call_running_statistics_and_evaluation_equal_one_layer_per_level(burn_in):
    """Each call keeps its own running statistics (also as BN during burn-in), and evaluation
    normalises the i-th call of a forward with the i-th call's: as separate layers would."""
    shared = _cbn(per_call=2, affine=True)
    separate = [_cbn(affine=True), _cbn(affine=True)]
    for layer in (shared, *separate):
        layer.active_window = 1 if burn_in else layer.window
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(0.5, 2.0, 4))
    _train([shared, shared])
    _train(separate)
    for call, layer in enumerate(separate):
        mean, var = shared._running_stats(call)
        torch.testing.assert_close(mean, layer.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(var, layer.running_var, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(shared.running_mean, shared.call1_running_mean)
    shared.eval()
    x = [torch.randn(2, 4, 5, 5, dtype=torch.float64) for _ in range(2)]
    for _ in range(2):  # two evaluation forwards: the call count restarts with each level 0
        for call, layer in enumerate(separate):
            torch.testing.assert_close(shared(x[call]), layer.eval()(x[call]), rtol=1e-12,
                                       atol=1e-12)


def _cbn_affine(**kwargs):
    return CBN(4, window=3, momentum=None, **kwargs).double()


def test_per_call_loads_one_set_of_running_statistics_into_every_call():
    """A BN or pooled-CBN checkpoint (one running mean/var) loads strictly: every call starts
    from it; a per-call checkpoint restores each call's."""
    bn = nn.BatchNorm2d(4).double()
    bn.running_mean.normal_()
    shared = _cbn_affine(per_call=3)
    shared.load_state_dict(bn.state_dict())
    for call in range(3):
        torch.testing.assert_close(shared._running_stats(call)[0], bn.running_mean)
    _train([shared, shared], steps=2)
    fresh = _cbn_affine(per_call=3)
    fresh.load_state_dict(shared.state_dict())
    for call in range(3):
        torch.testing.assert_close(fresh._running_stats(call)[1], shared._running_stats(call)[1],
                                   rtol=0, atol=0)


def test_pooled_default_mixes_the_levels():
    """The default pools both calls into one entry per iteration: not what per-level layers do."""
    pooled = _cbn()
    got, _ = _train([pooled, pooled])
    want, _ = _train([_cbn(), _cbn()])
    assert not torch.allclose(got[-1][1], want[-1][1])
    assert len(pooled.history.entries()) == 2 and pooled.per_call == 0


def test_per_call_state_dict_round_trip():
    shared = _cbn(per_call=2)
    _train([shared, shared], steps=3)
    state = shared.state_dict()
    assert 'call1_history_mean' in state and 'history_mean' in state
    fresh = _cbn(per_call=2)
    fresh.load_state_dict(state)
    for call in range(2):
        for a, b in zip(fresh.call_histories[call].entries(), shared.call_histories[call].entries()):
            torch.testing.assert_close(a.mean, b.mean, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match='call1_history_mean'):  # a pooled layer cannot hold it
        _cbn().load_state_dict(state)


def test_per_call_refuses_checkpointing():
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3, per_call=2)
    x = torch.randn(2, 3, 5, 5)
    with pytest.raises(RuntimeError, match='per_call'):
        checkpoint(lambda t: norm(conv(t)), x, use_reentrant=False).sum().backward()


@pytest.mark.parametrize('value', [-1, 1.5, True, '2'])
def test_per_call_must_be_a_count(value):
    with pytest.raises(ValueError, match='per_call'):
        CBN(4, per_call=value)
    assert 'per_call=3' in repr(CBN(4, per_call=3)) and 'per_call' not in repr(CBN(4))


def test_deepcopy_keeps_one_history_per_call():
    shared = _cbn(per_call=2)
    _train([shared, shared], steps=2)
    clone = copy.deepcopy(shared)
    assert clone.history is clone.call_histories[0]
    assert clone.call_histories[1].entries()[0].mean.data_ptr() != \
        shared.call_histories[1].entries()[0].mean.data_ptr()


def test_per_call_history_keys_are_history_keys():
    """Tools that drop the history (publish_model, test.py) see every call's keys."""
    from cbn_mmdet.models.cbn import is_history_state_key
    shared = _cbn(per_call=2)
    _train([shared, shared], steps=2)
    model = nn.Sequential(shared)
    history = {k for k in model.state_dict() if is_history_state_key(k)}
    assert history == {k for k in model.state_dict() if 'history' in k}
    assert '0.call1_history_var_grad' in history and not is_history_state_key('0.running_mean')


def test_per_call_window_against_recomputed_oracle():
    """Each call's window holds its own level's past batches moved to the current weights: their
    means equal the means of those batches' conv outputs recomputed with the current weights (exact:
    the mean is linear in θ). (Variances are first-order: with these white inputs and BN's
    scale-invariant gradients their change is mostly second order, so they are not compared here.)"""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = _cbn(per_call=2)
    opt = torch.optim.SGD(conv.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(1)
    inputs = []
    for step in range(4):
        levels = _levels(gen)[0]
        inputs.append(levels)
        order = [norm.call_histories[call].slots_newest_first() for call in range(2)]
        outs = [norm(conv(x)) for x in levels]
        if step == 3:
            break  # the weights of this forward are the current ones
        sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view_as(o)).sum()
            for o in outs).backward()
        opt.step()
        opt.zero_grad()
    for call in range(2):
        past = norm.past_window(call=call)
        assert len(order[call]) == 2
        for age, slot in enumerate(order[call]):  # iterations 2 and 1
            with torch.no_grad():
                x = conv(inputs[2 - age][call])
            mean = x.mean((0, 2, 3))
            torch.testing.assert_close(past['mean_compensated'][slot], mean, rtol=1e-10,
                                       atol=1e-10)
            assert not torch.allclose(past['mean'][slot], mean)  # the weights did move
