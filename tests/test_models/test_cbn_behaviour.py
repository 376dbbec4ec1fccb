"""CBN layer behaviours pinned through the public API: non-finite batches, version-3 checkpoints,
the statistics-gradient and running-statistics options, window resizing, which convs are bound,
and affine=False / track_running_stats=False.

Every test is a few small float64 forwards (well under a second each)."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.models import BindStatus, CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models import iteration_clock


def _batches(n, shape=(2, 3, 6, 5), seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, dtype=dtype, generator=gen) + 0.5 for _ in range(n)]


def _conv(c_in=3, c_out=4, kernel=3, seed=0, **kw):
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2, **kw).double()


def _bn_over(outputs, momentum=1.0):
    """nn.BatchNorm2d's running statistics after one training forward on the concatenation."""
    bn = nn.BatchNorm2d(outputs[0].shape[1], momentum=momentum).double()
    with torch.no_grad():
        bn(torch.cat(outputs))
    return bn.running_mean, bn.running_var


# ---------------------------------------------------------------- non-finite batches
def test_non_finite_batch_on_a_later_iteration_stays_out_of_windows_and_running_stats():
    """Weights fixed (the window is then plain pooling): a NaN batch at iteration 2 leaves the
    running statistics alone, its slot holds count 0, and the next iterations' windows skip it."""
    conv, norm = _conv(), CBN(4, window=3, momentum=1.0).double()
    xs = _batches(5, seed=1)
    xs[2][0, 0, 0, 0] = float('nan')
    outs = [conv(x) for x in xs]
    recorded = []  # each iteration's entry mean, as recorded
    for i, out in enumerate(outs):
        before = norm.running_mean.clone(), norm.running_var.clone()
        y = norm(out)
        recorded.append(norm.history.entries()[0].mean.clone())
        if i == 2:
            assert torch.equal(norm.running_mean, before[0])
            assert torch.equal(norm.running_var, before[1])
            assert float(norm.history.entries()[0].count) == 0
            ring = norm.history.get  # no NaN anywhere in the ring
            assert torch.isfinite(ring('history_mean')).all()
            assert torch.isfinite(ring('history_var')).all()
        else:
            assert torch.isfinite(y).all()
        if i in (3, 4):  # past: iteration 2 (NaN, left out) and iteration 1 (i = 3) or 3 (i = 4)
            used = 1 if i == 3 else 3
            window = norm.past_window()
            valid = window['valid']  # the window's only entry is iteration `used`'s
            assert float(valid.sum()) == 1
            torch.testing.assert_close(window['mean'][valid > 0], recorded[used][None], rtol=0,
                                       atol=0)
            expected = _bn_over([outs[used], outs[i]])
        if i >= 3:
            torch.testing.assert_close(norm.running_mean, expected[0], rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(norm.running_var, expected[1], rtol=1e-12, atol=1e-12)
        iteration_clock.next_iteration()


def test_non_finite_second_call_of_a_pooled_iteration_stays_out():
    """Two calls before one optimizer step, the second NaN: the iteration's entry is the first call
    alone, the running statistics ignore the NaN call, and the next window pools the finite data."""
    conv, norm = _conv(), CBN(4, window=3, momentum=1.0).double()
    a0, a1, b1, c2 = _batches(4, seed=2)
    b1[1, 2, 3, 4] = float('inf')
    out_a0, out_a1, out_b1, out_c2 = (conv(x) for x in (a0, a1, b1, c2))
    norm(out_a0)
    iteration_clock.next_iteration()
    norm(out_a1)
    index = norm.history.index().clone()
    entry = norm.history.entries()[0]
    entry = {k: getattr(entry, k).clone() for k in ('count', 'mean', 'var')}
    running = norm.running_mean.clone(), norm.running_var.clone()
    norm(out_b1)  # same iteration: pooled into the open entry
    # the same open entry, no new one: the cursor did not move
    assert norm.history_open and torch.equal(norm.history.index(), index)
    assert norm.history_length == 2
    assert torch.equal(norm.running_mean, running[0]) and torch.equal(norm.running_var, running[1])
    n = out_a1.shape[0] * out_a1.shape[2] * out_a1.shape[3]
    newest = norm.history.entries()[0]
    assert float(newest.count) == n == float(entry['count'])
    torch.testing.assert_close(newest.mean, entry['mean'], rtol=0, atol=0)
    torch.testing.assert_close(newest.var, entry['var'], rtol=0, atol=0)
    iteration_clock.next_iteration()
    norm(out_c2)
    assert float(norm.past_window()['valid'].sum()) == 2
    expected = _bn_over([out_a0, out_a1, out_c2])
    torch.testing.assert_close(norm.running_mean, expected[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(norm.running_var, expected[1], rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- version-3 checkpoints
def _v3_state(layer_window, saved_slots, index):
    """A version-3 state dict: ``saved_slots`` ring slots (slot i holds mean i), ``history_index``
    ``[head, closed entries, head entry open]``."""
    norm = CBN(2, window=layer_window)
    state = norm.state_dict()
    means = torch.arange(saved_slots, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    state.update(history_mean=means, history_var=torch.ones(saved_slots, 2),
                 history_count=torch.full((saved_slots, ), 8.0),
                 history_mean_ref=torch.zeros(saved_slots, 2),
                 history_var_ref=torch.zeros(saved_slots, 2),
                 history_compensable=torch.zeros(saved_slots),
                 history_index=torch.tensor(index))
    state._metadata = {'': {'version': 3}}
    return norm, state


# (layer window, version-3 ring size, history_index, entry means newest first, open). Read as
# version 4 (filled = all entries, the open one included) each gives other entries.
V3_CASES = [
    (4, 4, [2, 3, 0], [1, 0, 3], False),   # closed entries behind the head (v4 reading: 2, 1, 0)
    (4, 4, [1, 2, 1], [1, 0, 3], True),    # open head + 2 closed (v4 reading: 2 entries)
    (6, 4, [2, 3, 0], [1, 0, 3], False),   # larger window: all kept
    (2, 4, [2, 3, 0], [1], False),         # smaller window: the newest kept
    (3, 3, [0, 2, 0], [2, 1], False),      # head wraps around (v4 reading: 0, 2)
]


@pytest.mark.parametrize('window,saved_slots,index,means,is_open', V3_CASES)
def test_version3_checkpoint_is_read_as_version3(window, saved_slots, index, means, is_open):
    norm, state = _v3_state(window, saved_slots, index)
    result = norm.load_state_dict(state)
    assert not result.missing_keys and not result.unexpected_keys
    assert norm.history_length == len(means) and norm.history_open == is_open
    assert norm.history.slots == window - 1 == norm.history.get('history_mean').shape[0]
    entries = norm.history.entries()  # newest first
    assert [float(e.mean[0]) for e in entries] == [float(m) for m in means]
    assert [float(e.count) for e in entries] == [8.0] * len(means)
    # the ring continues from the right head: the next iteration replaces the oldest entry only
    # (the ring is full, so the new entry took the oldest entry's slot)
    if len(means) == window - 1:
        conv = nn.Conv2d(3, 2, 3, padding=1)
        iteration_clock.next_iteration()
        norm(conv(torch.randn(2, 3, 5, 5)))
        assert float(norm.past_window()['valid'].sum()) == len(means)
        entries = norm.history.entries()
        assert len(entries) == window - 1
        kept = [float(e.mean[0]) for e in entries[1:]]
        assert kept == [float(m) for m in means[:-1]]


# ---------------------------------------------------------------- statistics_gradients='autograd'
@pytest.mark.parametrize('groups,bias', [(1, False), (2, True)])
def test_autograd_statistic_gradients_compensate_like_closed_form(groups, bias):
    """The authors' two autograd passes and Appendix B's closed forms give the same compensated
    window (float64) once the weights have moved."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, bias=bias).double()
    closed, auto = CBN(6, window=4).double(), CBN(6, window=4, statistics_gradients='autograd').double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.5)
    target = torch.randn(2, 6, 6, 5, dtype=torch.float64)
    for x in _batches(5, shape=(2, 4, 6, 5), seed=3):
        out = conv(x)
        y = closed(out)
        y_auto = auto(out)
        torch.testing.assert_close(y_auto, y, rtol=1e-10, atol=1e-10)
        (y * target).mean().backward()
        opt.step()
        opt.zero_grad()
    ref, got = closed.past_window(), auto.past_window()
    assert torch.equal(ref['valid'], got['valid']) and float(ref['valid'].sum()) == 3
    correction = (ref['var_compensated'] - ref['var']).abs().max()
    assert correction > 1e-3 * ref['var'].mean()  # the weights moved enough to matter
    for key in ('mean_compensated', 'var_compensated'):
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12, msg=key)


# ---------------------------------------------------------------- running statistics
def test_cumulative_momentum_equals_batchnorm_through_burn_in_and_first_iteration():
    """momentum=None: 1/n with n counting every training forward, as nn.BatchNorm2d(momentum=None):
    equal during burn-in (window 1) and at the first CBN iteration (no history: its own batch)."""
    conv = _conv()
    norm, bn = CBN(4, window=3, momentum=None).double(), nn.BatchNorm2d(4, momentum=None).double()
    norm.active_window = 1
    for i, x in enumerate(_batches(3, seed=4)):
        if i == 2:
            norm.active_window = 3  # burn-in over; nothing recorded so far
        out = conv(x)
        norm(out)
        bn(out)
        torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-12, atol=1e-14)
        assert int(norm.num_batches_tracked) == i + 1
        iteration_clock.next_iteration()
    assert norm.history_length == 1


@pytest.mark.parametrize('momentum', [0.1, None])
def test_running_stats_batch_follows_the_current_batch_like_batchnorm(momentum):
    """running_stats='batch': with a full, compensated window the running statistics still follow
    each batch exactly as nn.BatchNorm2d's (momentum 0.1, or None: cumulative)."""
    conv = _conv()
    norm = CBN(4, window=3, momentum=momentum, running_stats='batch').double()
    bn = nn.BatchNorm2d(4, momentum=momentum).double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.3)
    for x in _batches(5, seed=5):
        out = conv(x)
        norm(out).square().mean().backward()
        bn(out.detach())
        opt.step()
        opt.zero_grad()
        torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(norm.running_var, bn.running_var, rtol=1e-12, atol=1e-14)
    assert float(norm.past_window()['valid'].sum()) == 2  # the window was in use
    assert (norm.past_window()['var_compensated'] - norm.past_window()['var']).abs().max() > 1e-3


# ---------------------------------------------------------------- window changes
def test_set_window_growing_follows_the_active_window_only_when_it_was_full():
    full = CBN(4, window=3)
    full.set_window(5)
    assert full.window == 5 and full.active_window == 5
    ramping = CBN(4, window=4)
    ramping.active_window = 2
    ramping.set_window(6)
    assert ramping.window == 6 and ramping.active_window == 2
    ramping.set_window(8)
    assert ramping.active_window == 2
    ramping.set_window(1)
    assert ramping.window == 1 and ramping.active_window == 1
    shrinking = CBN(4, window=6)
    shrinking.active_window = 5
    shrinking.set_window(3)
    assert shrinking.active_window == 3
    shrinking.active_window = 2
    shrinking.set_window(3)  # unchanged window: nothing changes
    assert shrinking.active_window == 2


# ---------------------------------------------------------------- which conv is bound
def _train_steps(conv, norm, xs, lr=0.3):
    opt = torch.optim.SGD(conv.parameters(), lr=lr)
    for x in xs:
        norm(conv(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize('c_in,kernel', [(3, 1), (5, 3)], ids=['kernel-size', 'in-channels'])
def test_conv_replaced_by_another_geometry_discards_past_gradients(c_in, kernel):
    """A conv swapped for one of another shape: warns, and the iterations recorded under the old
    conv are used as recorded (never compensated with gradients of another conv), also later."""
    norm = CBN(4, window=4).double()
    _train_steps(_conv(), norm, _batches(3, seed=7))
    new = _conv(c_in=c_in, kernel=kernel, seed=1)
    xs = _batches(2, shape=(2, c_in, 6, 5), seed=8)
    # slot positions: past_window() is indexed by ring slot, entries are mapped to it by slot id
    old_slots = norm.history.slots_newest_first()
    with pytest.warns(UserWarning, match='changed shape'):
        norm(new(xs[0])).square().mean().backward()
    window = norm.past_window()
    assert float(window['valid'].sum()) == 3
    torch.testing.assert_close(window['mean_compensated'], window['mean'], rtol=0, atol=0)
    torch.testing.assert_close(window['var_compensated'], window['var'], rtol=0, atol=0)
    with torch.no_grad():
        new.weight.mul_(1.5)
        new.bias.add_(0.5)
    iteration_clock.next_iteration()
    new_slot = norm.history.slots_newest_first()[0]
    norm(new(xs[1]))
    window = norm.past_window()
    assert float(window['valid'].sum()) == 3
    for slot in old_slots[:2]:  # recorded under the old conv: as recorded
        torch.testing.assert_close(window['mean_compensated'][slot], window['mean'][slot],
                                   rtol=0, atol=0)
        torch.testing.assert_close(window['var_compensated'][slot], window['var'][slot],
                                   rtol=0, atol=0)
    # recorded under the new conv: compensated for its weight change
    assert (window['mean_compensated'][new_slot] - window['mean'][new_slot]).abs().min() > 1e-3


class _StandardisedConv(nn.Conv2d):
    """Weight standardisation (centred per output channel): the applied weight is computed."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


def test_computed_weight_is_compensated_with_the_applied_weight():
    """The window mean after Eq. 7 is exact for the weight the conv applies (its mean is linear in
    it); the raw parameter differs from it by a per-channel shift that must not enter."""
    gen = torch.Generator().manual_seed(9)
    conv = _StandardisedConv(4, 6, 3, padding=1).double()
    direction = torch.randn(conv.weight.shape, dtype=torch.float64, generator=gen) + 0.5
    norm = CBN(6, window=3, momentum=1.0).double()
    xs = _batches(4, shape=(2, 4, 6, 5), seed=10)
    for i, x in enumerate(xs):
        if i:
            with torch.no_grad():
                conv.weight.add_(0.05 * direction)  # non-zero mean per output channel
            iteration_clock.next_iteration()
        norm(conv(x))
    assert norm.last_bind_status == BindStatus.CONV
    window = norm.past_window()
    assert (window['mean_compensated'] - window['mean']).abs().max() > 1e-2
    with torch.no_grad():
        pooled = torch.cat([conv(x) for x in xs[-3:]])
    torch.testing.assert_close(norm.running_mean, pooled.mean((0, 2, 3)), rtol=1e-10, atol=1e-10)


def test_transposed_conv_is_not_bound():
    """A transposed conv is not the conv of Eqs. 7-8: fallback='bn' (BN on the batch, no history)."""
    torch.manual_seed(0)
    up = nn.ConvTranspose2d(3, 4, 3, stride=2).double()
    norm, bn = CBN(4, window=3).double(), nn.BatchNorm2d(4).double()
    with pytest.warns(UserWarning, match='not the output of a trainable conv'):
        for x in _batches(3, seed=11):
            out = up(x)
            torch.testing.assert_close(norm(out), bn(out), rtol=1e-12, atol=1e-12)
            iteration_clock.next_iteration()
    assert norm.last_bind_status == BindStatus.NOT_CONV
    assert norm.history_length == 0 and norm.history.index() is None
    torch.testing.assert_close(norm.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- affine=False, no running stats
def _window_reference(out, past, eps):
    """Eq. 12 without γ, β: the window over equal-sized batches is BN over their concatenation,
    with gradients through the current batch only."""
    pooled = torch.cat([out] + [p.detach() for p in past])
    mean = pooled.mean((0, 2, 3)).view(1, -1, 1, 1)
    var = pooled.var((0, 2, 3), correction=0).view(1, -1, 1, 1)
    return (out - mean) / torch.sqrt(var + eps)


@pytest.mark.parametrize('options', [dict(affine=False), dict(track_running_stats=False),
                                     dict(affine=False, track_running_stats=False)])
def test_without_affine_or_running_stats_trains_with_the_window(options):
    """Weights fixed between iterations: outputs and input gradients equal the pooled reference."""
    conv = _conv()
    norm = CBN(4, window=3, **options).double()
    if norm.affine:
        assert norm.weight is not None
    assert (norm.running_mean is None) == (not norm.track_running_stats)
    gen = torch.Generator().manual_seed(12)
    outs = []
    for i, x in enumerate(_batches(4, seed=12)):
        out = conv(x)
        ref_leaf = out.detach().requires_grad_(True)
        y = norm(out)  # bound to the conv
        ref = _window_reference(ref_leaf, outs[-2:], norm.eps)
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
        g = torch.randn(y.shape, dtype=torch.float64, generator=gen)
        grad_out, = torch.autograd.grad(y, out, g)
        grad_ref, = torch.autograd.grad(ref, ref_leaf, g)
        torch.testing.assert_close(grad_out, grad_ref, rtol=1e-10, atol=1e-10)
        outs.append(out.detach())
        iteration_clock.next_iteration()
    assert norm.last_bind_status == BindStatus.CONV and norm.history_length == 2
    norm.eval()
    x = conv(_batches(1, seed=13)[0])
    expected = nn.BatchNorm2d(4, affine=False, track_running_stats=norm.track_running_stats).double()
    if norm.track_running_stats:
        expected.load_state_dict({k: v for k, v in norm.state_dict().items()
                                  if k in expected.state_dict()})
    expected.eval()
    torch.testing.assert_close(norm(x), expected(x), rtol=1e-12, atol=1e-12)
