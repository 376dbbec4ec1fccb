"""CBN behaviours no other fast test pins: a version-4 checkpoint behind a conv with a trainable
bias, a window change between two calls of one iteration, the monitor while the window fills,
``.bfloat16()`` on a layer holding history, and inputs whose channel count is not ``num_features``.

Every test is a few small forwards (well under a second each)."""
import copy
import re
import warnings

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.models import BatchRenorm2d as BRN, CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models import iteration_clock
from cbn_mmdet.models.cbn import HISTORY_STATE_KEYS
from test_cbn_behaviour import _batches, _conv


def _model(window=4, dtype=torch.float64):
    """conv (trainable bias) + CBN."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=True), CBN(4, window=window)).to(dtype)


def _train(model, xs, lr=0.3):
    """SGD steps (no optimizer state); returns the outputs."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    outs = []
    for x in xs:
        y = model(x)
        y.square().mean().backward()
        opt.step()
        opt.zero_grad()
        outs.append(y.detach())
    return outs


# ---------------------------------------------------------------- version-4 checkpoints
def test_version4_checkpoint_behind_a_biased_conv_continues_like_version5():
    """Version 4 did not save whether the conv's bias was trainable: the loaded history adopts the
    bound conv's, so training continues without a geometry warning, as from a version-5 checkpoint
    and as the uninterrupted model."""
    xs = _batches(6, seed=20)
    model = _model()
    _train(model, xs[:3])
    v5 = copy.deepcopy(model.state_dict())
    assert v5._metadata['1']['version'] == 5 and v5['1.history_index'].tolist()[3] == 1
    v4 = copy.deepcopy(v5)
    v4['1.history_index'] = v4['1.history_index'][:3].clone()
    v4._metadata['1']['version'] = 4
    expected = _train(model, xs[3:])  # uninterrupted

    for state in (v5, v4):
        resumed = _model()
        with torch.no_grad():
            resumed[0].weight.mul_(3)  # the load is what matters
        assert resumed.load_state_dict(state, strict=True)
        assert resumed[1].history_length == 3
        with warnings.catch_warnings():
            warnings.simplefilter('error')  # e.g. 'changed shape, or its bias became trainable'
            got = _train(resumed, xs[3:])
        assert resumed[1].past_window()['valid'].sum() == 3
        for y, y_ref in zip(got, expected):
            torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
        # the bias term was compensated too: the recorded gradients were kept
        assert resumed[1].history.geometry[5] is True
        assert all(float(e.compensable) == 1 for e in resumed[1].history.entries())


# ---------------------------------------------------------------- window changes
def test_window_change_between_two_calls_of_one_iteration_keeps_pooling():
    """set_window between two forwards of one iteration: the second call still pools into the
    iteration's open entry (one entry holding both batches), it does not start another."""
    conv, norm = _conv(), CBN(4, window=3).double()
    opt = torch.optim.SGD(conv.parameters(), lr=0.3)
    for x in _batches(2, seed=21):
        norm(conv(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    a, b = _batches(2, seed=22)
    out_a, out_b = conv(a), conv(b)
    norm(out_a)
    assert norm.history_length == 2 and norm.history_open
    norm.set_window(4)
    assert norm.history_length == 2 and norm.history_open
    norm(out_b)
    assert norm.history_length == 2 and norm.history_open  # no entry of its own
    n = out_a.shape[0] * out_a.shape[2] * out_a.shape[3]
    newest = norm.history.entries()[0]
    assert float(newest.count) == 2 * n
    pooled = torch.cat([out_a, out_b]).detach()
    torch.testing.assert_close(newest.mean, pooled.mean((0, 2, 3)), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(newest.var, pooled.var((0, 2, 3), correction=0), rtol=1e-12,
                               atol=1e-12)


# ---------------------------------------------------------------- monitor
def test_monitor_averages_the_correction_over_the_valid_entries_only():
    """window=4 at the second iteration: one past entry in a ring of three slots; the correction
    size is its mean over that entry's channels, the empty slots do not dilute it."""
    conv, norm = _conv(), CBN(4, window=4, monitor=True).double()
    gen = torch.Generator().manual_seed(23)
    for i, x in enumerate(_batches(2, seed=23)):
        if i:  # an update of weight and bias between the two iterations
            with torch.no_grad():
                for p in conv.parameters():
                    p.add_(0.1 * torch.randn(p.shape, dtype=p.dtype, generator=gen))
            iteration_clock.next_iteration()
        norm(conv(x))
    window = norm.past_window()
    valid = window['valid'] > 0
    assert int(valid.sum()) == 1 and valid.numel() == 3
    mean, var = window['mean'][valid], window['var'][valid]
    mean_c, var_c = window['mean_compensated'][valid], window['var_compensated'][valid]
    rel_mean = ((mean_c - mean).abs() / (var + norm.eps).sqrt()).mean()
    rel_var = ((var_c - var).abs() / (var + norm.eps)).mean()
    assert rel_mean > 1e-3 and rel_var > 1e-3  # the weights moved enough to matter
    torch.testing.assert_close(norm.last_correction['mean'], rel_mean, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(norm.last_correction['var'], rel_var, rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- device and dtype moves
def test_bfloat16_keeps_the_history_in_its_precision_and_values():
    """.bfloat16() never narrows the history below the statistics' float32 (as .half()), the
    float32 ∂var/∂θ included, and keeps every value."""
    model = _model(dtype=torch.float32)
    _train(model, _batches(3, seed=24, dtype=torch.float32), lr=0.05)
    names = [k for k in HISTORY_STATE_KEYS if k != 'history_index']
    saved = {k: model[1].history.get(k).clone() for k in names}
    assert all(t is not None and t.dtype == torch.float32 for t in saved.values())
    index = model[1].history.index().clone()
    narrow = copy.deepcopy(model).bfloat16()
    assert narrow[1].weight.dtype == torch.bfloat16  # the module itself did move
    for name, value in saved.items():
        moved = narrow[1].history.get(name)
        assert moved.dtype == torch.float32, name
        torch.testing.assert_close(moved, value, rtol=0, atol=0, msg=name)
    assert torch.equal(narrow[1].history.index(), index)


# ---------------------------------------------------------------- channel count
def _assert_wrong_channels_refused(norm, x, owner, expected, got):
    """In training, then in evaluation: a ValueError naming num_features and the input's channels."""
    message = re.escape(f'{owner} expected input with {expected} channels (num_features), got {got}')
    for training in (True, False):
        norm.train(training)
        with pytest.raises(ValueError, match=message):
            norm(x)


def test_cbn_input_with_another_channel_count_names_both():
    """Train (window filled, the compensated path) and eval: a ValueError naming num_features and
    the input's channels, before any internal size mismatch."""
    norm = CBN(8, window=3).double()
    conv8 = _conv(c_out=8)
    for x in _batches(3, seed=25):
        norm(conv8(x))
        iteration_clock.next_iteration()
    assert norm.history_length == 2
    _assert_wrong_channels_refused(norm, _conv(c_out=4)(_batches(1, seed=26)[0]), 'CBN', 8, 4)


def test_brn_input_with_another_channel_count_names_both():
    norm = BRN(8, warmup_iters=0, rmax_iters=1, dmax_iters=1).double()
    norm(_conv(c_out=8)(_batches(1, seed=27)[0]))
    _assert_wrong_channels_refused(norm, _conv(c_out=4)(_batches(1, seed=28)[0]), 'BRN', 8, 4)


def test_sync_cbn_input_errors_name_sync_cbn():
    from cbn_mmdet.models import SyncCrossIterationBatchNorm2d as SyncCBN
    with pytest.raises(ValueError, match=r'^SyncCBN expects 4D'):
        SyncCBN(4)(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match=r'^SyncCBN expected input with 4 channels'):
        SyncCBN(4)(torch.randn(2, 3, 5, 5))
