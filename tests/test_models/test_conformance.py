"""Conformance with ``nn.BatchNorm2d``: torch's own ModuleInfo samples for ``BatchNorm2d``
(``torch.testing._internal.common_modules.module_db``) run through the checks of torch's
``test/test_modules.py`` with CBN, SyncCBN and BRN swapped in, each compared with ``BatchNorm2d``
built from the same sample; then the same checks on a conv + CBN model whose window is full, against
a composite reference; then deployment (TorchScript, ``torch.export``, ``torch.jit.trace``); then
a sweep of inputs beyond the samples (dtype, device, shape, channel count, empty, non-finite).

The checks (reconstructed from the ModuleInfo API; torch's test file is not installed): factory
kwargs (``device``/``dtype`` → parameters and buffers), ``repr``, pickle round trips of the module
and of its state dict, non-contiguous inputs, memory formats, ``gradcheck`` and ``gradgradcheck``
(float64, train and eval, total and partial derivatives; whole Jacobians for the unnamed sample,
random projections (``fast_mode``) for the others, to keep the file to seconds), meta-device
construction and ``to_empty``, train/eval switching. Every way in which a layer deliberately
differs from BN is a row of :data:`DIFFERENCES`, asserted where it shows (an ``xfail(strict=True)``
on the checks of a sample a layer refuses, a count one lower where BN counts an empty batch,
history keys beyond BN's) and once more on its own in :func:`test_deliberate_difference`.
"""
import copy
import io
import re
import warnings
from typing import NamedTuple, Tuple

import pytest
import torch
import torch.nn as nn
from torch._subclasses.meta_utils import assert_metadata_eq
from torch.testing._internal.common_modules import module_db  # needs expecttest (setup_env.sh)

from cbn_mmdet.models import (BatchRenorm2d, CrossIterationBatchNorm2d,
                              SyncCrossIterationBatchNorm2d, iteration_clock)
from cbn_mmdet.models.cbn import HISTORY_STATE_KEYS, is_history_state_key
from cbn_mmdet.ops.window_norm import window_batch_norm_reference

# the layers' documented once-per-layer notices, which BN does not give (row 'warnings' below)
pytestmark = [
    pytest.mark.filterwarnings(r'ignore:CBN\(\d+\). its conv has frozen weights:UserWarning'),
    pytest.mark.filterwarnings(r'ignore:CBN\(\d+\). SyncCBN outside a distributed run:UserWarning'),
]

BN_INFO = next(info for info in module_db if info.module_cls is nn.BatchNorm2d)

#: The layers under test. A sample's input is a leaf tensor: nothing upstream of the layer can
#: change with the weights, so CBN normalises it with its window uncompensated (exact then) and
#: records it: CBN's own kernel and history, with an empty window in the first iteration (BN's
#: maths in CBN's code).
LAYERS = {
    'CBN': CrossIterationBatchNorm2d,
    'SyncCBN': SyncCrossIterationBatchNorm2d,  # outside a distributed run: CBN
    'BRN': BatchRenorm2d,
}
RECORDS_HISTORY = ('CBN', 'SyncCBN')  # a training forward of a non-empty batch records an entry


class Difference(NamedTuple):
    layers: Tuple[str, ...]
    case: str  # a BatchNorm2d sample's desc ('default' for the unnamed one) or a case beyond them
    bn: str    # what BatchNorm2d does
    layer: str  # what the layers do instead
    reason: str


#: Every deliberate difference from ``nn.BatchNorm2d`` that these checks meet, with the reason.
#: Asserted by :func:`test_deliberate_difference` (one per row) and where the checks meet them.
DIFFERENCES = {
    'brn_tracks_running_stats': Difference(
        ('BRN', ), 'not_tracking_stats',
        'track_running_stats=False: normalises with the batch in training and evaluation',
        "refused: ValueError 'BRN track_running_stats must be True'",
        'r and d are ratios of the batch to the running statistics: without them BRN is undefined'),
    'empty_batch_not_counted': Difference(
        tuple(LAYERS), 'zero_batch',
        'a training forward of an empty batch adds 1 to num_batches_tracked (statistics unchanged)',
        'not counted: num_batches_tracked one lower than BN after it',
        'nothing was measured: with momentum=None BN then weighs the next batches as if the empty '
        "one had been averaged in; BRN's schedule counts forwards that measured; CBN records no "
        'history entry for it'),
    'history_state_keys': Difference(
        RECORDS_HISTORY, 'any sample, after a training forward of a non-empty batch',
        "state_dict() has BN's keys",
        "BN's keys plus the history's (history_*), created at the first recorded iteration",
        'the past iterations are module state, saved and resumed; a BN checkpoint still loads '
        'strictly (no history yet), and publish_model.py drops them for deployment'),
    'repr_options': Difference(
        tuple(LAYERS), 'any sample',
        "repr: BatchNorm2d(<BN's fields>)", "<class>(<BN's fields>, <the layer's own options>)",
        "the layer's options (window, compensate, rmax, ...) decide what training does"),
    'positive_eps': Difference(
        tuple(LAYERS), 'eps=0 (beyond the samples)', 'accepted',
        "refused: ValueError '... eps must be a positive number'",
        'with ε = 0 a zero variance (a constant channel; a compensated past variance clamped at 0 '
        'by Eq. 10) gives inf/NaN, which BN returns; the layers refuse the setting instead'),
    'momentum_range': Difference(
        tuple(LAYERS), 'momentum=1.5 (beyond the samples)', 'accepted (an extrapolating average)',
        "refused: ValueError '... momentum must be None or a number in [0, 1]'",
        'a config typo fails at construction with the value, not as drifting running statistics'),
    'dtype_error': Difference(
        tuple(LAYERS), 'float64 input to a float32 layer in training (beyond the samples)',
        "RuntimeError from the kernel ('mixed dtype')",
        'TypeError naming the layer and the allowed combinations (evaluation: BN\'s own error)',
        "the layer's statistics code runs before any kernel: it says what is allowed "
        '(float16/bfloat16 input with a float32 layer)'),
    'channel_error': Difference(
        tuple(LAYERS), 'input with another channel count than num_features (beyond the samples)',
        "RuntimeError from the kernel ('running_mean should contain 3 elements not 4'; without "
        'running statistics and affine parameters, none: it normalises any channel count)',
        "ValueError '<layer> expected input with 4 channels (num_features), got 3 ...', in training "
        'and evaluation, with or without running statistics',
        "behind a conv, CBN's window code would otherwise fail first with an internal size message; "
        'one message for every path'),
    'non_finite_batch': Difference(
        tuple(LAYERS), 'a training batch with inf or NaN (beyond the samples)',
        'output non-finite; the running statistics take the non-finite moments and the batch is '
        'counted',
        'output non-finite as BN\'s; the running statistics, num_batches_tracked and (CBN) the '
        "window's entries keep their values: the iteration's entry is empty",
        'one overflowing batch (e.g. under AMP, where the optimizer step is then skipped) would '
        "otherwise make BN's evaluation, BRN's r and d and CBN's window NaN for good"),
    'warnings': Difference(
        RECORDS_HISTORY, 'any sample in training', 'no warning',
        'one UserWarning per layer: nothing upstream is trainable, so the window is not '
        'compensated (exact then); SyncCBN: outside a distributed run it is CBN',
        'a layer that cannot do what it was configured for says so once (filtered in the checks)'),
    'torchscript': Difference(
        tuple(LAYERS), 'torch.jit.script (beyond the samples)', 'compiles',
        'RuntimeError naming torch.export, torch.jit.trace and publish_model.py + a BN model',
        'TorchScript compiles the training branch too (Python it cannot compile) and the forward '
        "hook CBN puts on its conv; in evaluation the layer is BN, and export/trace work"),
}
_REFUSED = {('BRN', 'not_tracking_stats'): 'brn_tracks_running_stats'}


def _desc(sample) -> str:
    return sample.desc or 'default'


DESCS = [_desc(s) for s in BN_INFO.module_inputs_func(BN_INFO, device='cpu', dtype=torch.float64,
                                                      requires_grad=False, training=True)]


def _cases(layers=tuple(LAYERS)):
    """(layer, sample desc) pairs; a sample the layer refuses is a strict xfail with its row."""
    cases = []
    for layer in layers:
        for desc in DESCS:
            row = _REFUSED.get((layer, desc))
            marks = ([pytest.mark.xfail(strict=True, raises=ValueError,
                                        reason=f'DIFFERENCES[{row!r}]: {DIFFERENCES[row].reason}')]
                     if row else [])
            cases.append(pytest.param(layer, desc, marks=marks, id=f'{layer}-{desc}'))
    return cases


def _sample(desc, training, requires_grad=True, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    for sample in BN_INFO.module_inputs_func(BN_INFO, device='cpu', dtype=dtype,
                                             requires_grad=requires_grad, training=training):
        if _desc(sample) == desc:
            return sample
    raise KeyError(desc)


def _make(layer, sample, **factory):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    return LAYERS[layer](*args, **kwargs, **factory)


def _pair(layer, sample, training, dtype=torch.float64):
    """The layer and ``nn.BatchNorm2d`` from the same constructor arguments, same parameters."""
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    m = _make(layer, sample).to(dtype).train(training)
    bn = nn.BatchNorm2d(*args, **kwargs).to(dtype).train(training)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.uniform_(0.5, 1.5)
        bn.load_state_dict(m.state_dict())
    return m, bn


def _input(sample):
    return sample.forward_input.args[0]


def _count_offset(layer, desc, training):
    """How many fewer batches the layer counts than BN (row 'empty_batch_not_counted')."""
    row = DIFFERENCES['empty_batch_not_counted']
    return int(training and desc == row.case and layer in row.layers)


def _assert_state_like_bn(m, bn, layer, desc, training, forwards=1, tol=1e-12):
    """Running statistics, batch count and state-dict keys of the layer against BN's."""
    if bn.running_mean is None:
        assert m.running_mean is None and m.running_var is None and m.num_batches_tracked is None
    else:
        torch.testing.assert_close(m.running_mean, bn.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(m.running_var, bn.running_var, rtol=tol, atol=tol)
        assert int(m.num_batches_tracked) == (int(bn.num_batches_tracked)
                                              - forwards * _count_offset(layer, desc, training))
    recorded = training and layer in RECORDS_HISTORY and desc != 'zero_batch'
    _assert_keys(m, bn, recorded)


def _assert_keys(m, bn, recorded):
    """BN's state-dict keys, in BN's order, then the history's if one was recorded (row
    'history_state_keys')."""
    keys, bn_keys = list(m.state_dict()), list(bn.state_dict())
    assert keys[:len(bn_keys)] == bn_keys
    extra = keys[len(bn_keys):]
    assert all(is_history_state_key(k) for k in extra), extra
    if recorded:
        assert {'history_mean', 'history_var', 'history_count', 'history_index'} <= set(extra)
    else:
        assert extra == []


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out, allow_unused=True)


# ================================================================ the BatchNorm2d samples
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_matches_batchnorm(layer, desc, training):
    """Two forwards and backwards: outputs, input and parameter gradients, running statistics,
    batch count, state-dict keys as BN's (a fresh CBN's empty window is BN in training too)."""
    sample = _sample(desc, training)
    x = _input(sample)
    m, bn = _pair(layer, sample, training)
    for step in range(2):
        y, y_bn = m(x), bn(x)
        torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(y)
        got = _grads(y, (x, *m.parameters()), g)
        want = _grads(y_bn, (x, *bn.parameters()), g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
        _assert_state_like_bn(m, bn, layer, desc, training, forwards=step + 1)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_factory_kwargs(layer, desc, training):
    """device/dtype at construction reach every parameter and buffer, as BN's; then
    ``.float()``/``.double()`` after a forward convert them, the history included."""
    sample = _sample(desc, training, requires_grad=False)
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    for dtype in (torch.float32, torch.float64):
        m = _make(layer, sample, device='cpu', dtype=dtype).train(training)
        bn = nn.BatchNorm2d(*args, **kwargs, device='cpu', dtype=dtype)
        for (name, t), (bn_name, bn_t) in zip([*m.named_parameters(), *m.named_buffers()],
                                              [*bn.named_parameters(), *bn.named_buffers()]):
            assert (name, t.device, t.dtype, t.shape) == (bn_name, bn_t.device, bn_t.dtype,
                                                          bn_t.shape)
        assert len([*m.parameters(), *m.buffers()]) == len([*bn.parameters(), *bn.buffers()])
    x = _input(sample)
    m = _make(layer, sample).train(training).to(torch.float64)
    m(x)
    for convert, dtype in (('float', torch.float32), ('double', torch.float64)):
        getattr(m, convert)()
        m(x.to(dtype))
        floating = [t for t in [*m.parameters(), *m.buffers(), *m.state_dict().values()]
                    if t.dtype.is_floating_point]
        assert floating and all(t.dtype == dtype and t.device.type == 'cpu' for t in floating)


@pytest.mark.parametrize('layer,desc', _cases())
def test_repr(layer, desc):
    """row 'repr_options': BN's fields first, then the layer's options."""
    sample = _sample(desc, True, requires_grad=False)
    m, bn = _pair(layer, sample, True)
    assert repr(m) == str(m)
    assert repr(m).startswith(f'{type(m).__name__}({bn.extra_repr()}, ')
    own = 'rmax=' if layer == 'BRN' else 'window=4'
    assert own in repr(m)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_save_load(layer, desc, training):
    """torch.save/torch.load of the module (weights_only=False) gives the same output; its state
    dict, saved after a forward (history included), round-trips with weights_only=True and loads
    strictly into a fresh layer, and into BN with the history as its only unexpected keys."""
    sample = _sample(desc, training, requires_grad=False)
    x = _input(sample)
    m, bn = _pair(layer, sample, training)
    sd_before = m.state_dict()
    y = m(x)
    torch.testing.assert_close(y, bn(x), rtol=1e-12, atol=1e-12)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(copied(x), m(x), rtol=0, atol=0)
    for sd in (sd_before, m.state_dict()):
        buffer = io.BytesIO()
        torch.save(sd, buffer)
        for weights_only in (False, True):
            buffer.seek(0)
            loaded = torch.load(buffer, weights_only=weights_only)
            assert list(loaded) == list(sd)
            for key in sd:
                assert torch.equal(loaded[key], sd[key]), key
    fresh = _make(layer, sample).to(torch.float64).train(training)
    fresh.load_state_dict(m.state_dict())  # strict
    for key, t in m.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], t), key
    iteration_clock.next_iteration()  # the next iteration: CBN's window holds this one
    x_next = _input(_sample(desc, training, requires_grad=False, seed=1))
    torch.testing.assert_close(fresh(x_next), m(x_next), rtol=0, atol=0)
    result = nn.BatchNorm2d(*sample.constructor_input.args,
                            **sample.constructor_input.kwargs).double().load_state_dict(
        m.state_dict(), strict=False)
    assert result.missing_keys == []
    assert all(is_history_state_key(k) for k in result.unexpected_keys)


def _assert_equal(a, b):
    assert a == b


def _non_contiguous(t):
    """torch's test_modules recipe: the same values, every other element of a doubled last dim."""
    out = torch.repeat_interleave(t, 2, dim=-1)[..., ::2].detach()
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_non_contiguous_tensors(layer, desc, training):
    """Every combination of (non-)contiguous input and output gradient gives the contiguous
    results, which are BN's."""
    sample = _sample(desc, training)
    x = _input(sample)
    m, bn = _pair(layer, sample, training)
    y_bn = bn(x)
    g = torch.randn_like(y_bn)
    want = _grads(y_bn, (x, *bn.parameters()), g)
    x_nc, g_nc = _non_contiguous(x), _non_contiguous(g)
    assert x.numel() == 0 or not x_nc.is_contiguous()
    for inp in (x, x_nc):
        for grad_out in (g, g_nc):
            y = m(inp)
            torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12)
            for a, b in zip(_grads(y, (inp, *m.parameters()), grad_out), want):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_memory_format(layer, desc, training):
    """channels_last input (module in each memory format): the contiguous values, a channels_last
    output and input gradient (ModuleInfo: module_memformat_affects_out=False)."""
    assert not BN_INFO.module_memformat_affects_out
    sample = _sample(desc, training)
    x = _input(sample)
    m, _ = _pair(layer, sample, training)
    y_ref = m(x)
    g = torch.rand_like(y_ref)
    ref = _grads(y_ref, (x, *m.parameters()), g)
    for input_format in (torch.contiguous_format, torch.channels_last):
        inp = x.detach().clone().to(memory_format=input_format).requires_grad_(True)
        for module_format in (torch.preserve_format, torch.contiguous_format, torch.channels_last):
            m.to(memory_format=module_format)
            y = m(inp)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            grads = _grads(y, (inp, *m.parameters()), torch.empty_like(y).copy_(g))
            for a, b in zip(grads, ref):
                torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
            for t in (y, grads[0]):
                assert t.numel() == 0 or t.is_contiguous(memory_format=input_format)


def _gradient_checks(check, m, x, full):
    """torch's _test_gradients_helper: the total derivative (input and parameters), then each
    parameter alone with the input. ``full``: the total derivative's whole Jacobian (torch's slow
    mode); otherwise, and for the partial derivatives, ``fast_mode`` (the Jacobian projected on
    random vectors, u^T J v numerically against analytically: a wrong term still shows, at a
    fraction of the cost)."""
    params = tuple(m.parameters())

    def fn(*inputs):
        return m(inputs[0])

    assert check(fn, (x, *params), nondet_tol=0.0, fast_mode=not full)
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, (x, *params), nondet_tol=0.0, fast_mode=True)
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


@pytest.mark.parametrize('check', [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=['gradcheck', 'gradgradcheck'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_gradients(layer, desc, training, check):
    """gradcheck and gradgradcheck in float64 (ModuleInfo: supports_gradgrad); whole Jacobians
    for the unnamed sample, projections for the others (runtime: seconds instead of minutes)."""
    assert BN_INFO.supports_gradgrad
    sample = _sample(desc, training)
    m, _ = _pair(layer, sample, training)
    _gradient_checks(check, m, _input(sample), full=desc == 'default')


@pytest.mark.parametrize('swap', [True, False], ids=['swap', 'no-swap'])
@pytest.mark.parametrize('layer,desc', _cases())
def test_meta_device_and_to_empty(layer, desc, swap):
    """Built under ``torch.device('meta')`` or with ``device='meta'``: meta tensors with the CPU
    layer's metadata; ``to_empty(device='cpu')`` gives CPU parameters (swapped or replaced as
    torch's test_to_empty expects), and after BN's resets the layer equals a fresh BN."""
    sample = _sample(desc, True, requires_grad=False, dtype=torch.float32)
    cpu = _make(layer, sample)
    with torch.device('meta'):
        in_context = _make(layer, sample)
    for m in (in_context, _make(layer, sample, device='meta')):
        pairs = list(zip([*m.parameters(), *m.buffers()], [*cpu.parameters(), *cpu.buffers()]))
        assert len(pairs) == len([*cpu.parameters(), *cpu.buffers()])
        for meta_t, cpu_t in pairs:
            assert meta_t.is_meta
            assert_metadata_eq(_assert_equal, meta_t, cpu_t)
    swap_before = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        ids, cdatas = [id(p) for p in in_context.parameters()], [p._cdata for p in
                                                                  in_context.parameters()]
        in_context.to_empty(device='cpu')
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swap_before)
    params = list(in_context.parameters())
    assert all(isinstance(p, nn.Parameter) and p.device.type == 'cpu'
               and p.dtype == torch.float32 for p in params)
    assert all(not b.is_meta for b in in_context.buffers())
    assert all((a == b) == swap for a, b in zip(ids, [id(p) for p in params]))
    assert all(a != b for a, b in zip(cdatas, [p._cdata for p in params]))
    in_context.reset_parameters()  # BN's: γ = 1, β = 0, running statistics reset
    x = _input(sample)
    bn = nn.BatchNorm2d(*sample.constructor_input.args, **sample.constructor_input.kwargs)
    torch.testing.assert_close(in_context(x), bn(x), rtol=1e-6, atol=1e-6)
    _assert_state_like_bn(in_context, bn, layer, desc, True, tol=1e-6)


@pytest.mark.parametrize('layer,desc', _cases())
def test_train_eval_switching(layer, desc):
    """train → eval → train → eval, each output and the running statistics as BN's doing the same;
    the forward reads ``training`` (ModuleInfo: train_and_eval_differ)."""
    assert BN_INFO.train_and_eval_differ
    m, bn = _pair(layer, _sample(desc, True), True)
    for step, training in enumerate((True, False, True, False)):
        x = _input(_sample(desc, training, seed=step))
        m.train(training), bn.train(training)
        assert m.training == training
        torch.testing.assert_close(m(x), bn(x), rtol=1e-12, atol=1e-12)
        _assert_state_like_bn(m, bn, layer, desc, True, forwards=(step + 2) // 2)
    del m.training
    with pytest.raises(AttributeError, match="'training'"):
        m(x)


# ================================================================ deliberate differences
def _bn_and_layer(layer, *args, **kwargs):
    return nn.BatchNorm2d(*args, **kwargs), LAYERS[layer](*args, **kwargs)


@pytest.mark.parametrize('row,layer', [(row, layer) for row, difference in DIFFERENCES.items()
                                       for layer in difference.layers])
def test_deliberate_difference(row, layer):
    """Each row of DIFFERENCES, on its own: what BN does, and what the layer does instead."""
    if row == 'brn_tracks_running_stats':
        nn.BatchNorm2d(3, track_running_stats=False)
        with pytest.raises(ValueError, match='BRN track_running_stats must be True'):
            BatchRenorm2d(3, track_running_stats=False)
    elif row == 'empty_batch_not_counted':
        bn, m = _bn_and_layer(layer, 5, momentum=None)
        empty = torch.randn(0, 5, 2, 2)
        bn(empty), m(empty)
        assert (int(bn.num_batches_tracked), int(m.num_batches_tracked)) == (1, 0)
        x = torch.randn(4, 5, 3, 3) + 1.0
        bn(x), m(x)  # BN averages x in with weight 1/2, as if the empty batch had been one
        torch.testing.assert_close(bn.running_mean, 0.5 * x.mean((0, 2, 3)))
        torch.testing.assert_close(m.running_mean, x.mean((0, 2, 3)))
    elif row == 'history_state_keys':
        bn, m = _bn_and_layer(layer, 3)
        assert list(m.state_dict()) == list(bn.state_dict())
        m.load_state_dict(bn.state_dict())  # strict: a BN checkpoint loads
        _assert_keys(m, bn, recorded=False)
        m(torch.randn(2, 3, 4, 4))
        _assert_keys(m, bn, recorded=True)
    elif row == 'repr_options':
        bn, m = _bn_and_layer(layer, 3)
        assert repr(bn) == f'BatchNorm2d({bn.extra_repr()})'
        assert repr(m).startswith(f'{type(m).__name__}({bn.extra_repr()}, ')
        assert repr(m) != f'{type(m).__name__}({bn.extra_repr()})'
    elif row == 'positive_eps':
        nn.BatchNorm2d(3, eps=0.0)
        with pytest.raises(ValueError, match='eps must be a positive number, got 0.0'):
            _bn_and_layer(layer, 3, eps=0.0)
    elif row == 'momentum_range':
        nn.BatchNorm2d(3, momentum=1.5)
        with pytest.raises(ValueError, match=r'momentum must be None or a number in \[0, 1\], got '
                                             r'1.5'):
            _bn_and_layer(layer, 3, momentum=1.5)
    elif row == 'dtype_error':
        bn, m = _bn_and_layer(layer, 3)
        x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
        with pytest.raises(RuntimeError, match='mixed dtype'):
            bn(x)
        with pytest.raises(TypeError, match='input dtype torch.float64 does not match the layer '
                                            'dtype torch.float32'):
            m(x)
        bn.eval(), m.eval()
        with pytest.raises(RuntimeError, match='mixed dtype'):
            m(x)
    elif row == 'channel_error':
        for kwargs in ({}, {'affine': False, 'track_running_stats': False}):
            bn, m = _bn_and_layer(layer, 4, **kwargs) if kwargs else _bn_and_layer(layer, 4)
            x = torch.randn(2, 3, 5, 5)
            if kwargs:
                bn(x)
            else:
                with pytest.raises(RuntimeError, match='running_mean should contain 3 elements not 4'):
                    bn(x)
            for training in (True, False):
                m.train(training)
                with pytest.raises(ValueError, match=r'expected input with 4 channels \(num_features\), '
                                                     'got 3'):
                    m(x)
            if layer == 'BRN':
                break  # (BRN always tracks running statistics: row 'brn_tracks_running_stats')
    elif row == 'non_finite_batch':
        bn, m = _bn_and_layer(layer, 3, momentum=None)
        x = torch.randn(2, 3, 4, 4)
        bn(x), m(x)
        before = copy.deepcopy(m.state_dict())
        bad = x.clone()
        bad[0, 1, 0, 0] = float('nan')
        iteration_clock.next_iteration()
        y_bn, y = bn(bad), m(bad)
        assert torch.equal(torch.isfinite(y), torch.isfinite(y_bn))
        assert not torch.isfinite(y[:, 1]).any() and torch.isfinite(y[:, [0, 2]]).all()
        assert bn.running_mean[1].isnan() and int(bn.num_batches_tracked) == 2
        for key in ('running_mean', 'running_var', 'num_batches_tracked'):
            assert torch.equal(m.state_dict()[key], before[key]), key
        if layer in RECORDS_HISTORY:
            assert float(m.history.entries()[0].count) == 0.0  # the iteration's entry is empty
        iteration_clock.next_iteration()
        m(x)  # and the next batch is averaged in as the second, not the third
        torch.testing.assert_close(m.running_mean, x.mean((0, 2, 3)))
    elif row == 'warnings':
        bn, m = _bn_and_layer(layer, 3)
        x = torch.randn(2, 3, 4, 4)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            bn(x)
        with pytest.warns(UserWarning) as caught:
            m(x)
            m(x)
        expected = ['CBN(3): its conv has frozen weights (or nothing upstream is trainable)']
        if layer == 'SyncCBN':
            expected.append('CBN(3): SyncCBN outside a distributed run')
        messages = [str(w.message) for w in caught]
        assert len(messages) == len(expected)  # once per layer, not per forward
        assert all(sum(msg.startswith(e) for msg in messages) == 1 for e in expected), messages
    elif row == 'torchscript':
        bn, m = _bn_and_layer(layer, 3)
        torch.jit.script(nn.Sequential(nn.Conv2d(2, 3, 1), bn).eval())
        with pytest.raises(RuntimeError) as raised:
            torch.jit.script(nn.Sequential(nn.Conv2d(2, 3, 1), m).eval())
        for needle in (f'{type(m).__name__}(3) cannot be compiled by torch.jit.script',
                       'torch.export.export', 'torch.jit.trace',
                       'tools/model_converters/publish_model.py', "norm_cfg=dict(type='BN')"):
            assert needle in str(raised.value)
    else:
        raise AssertionError(f'no assertion for the row {row!r}')


@pytest.mark.parametrize('layer', list(LAYERS))
def test_non_4d_input_is_refused_as_by_batchnorm2d(layer):
    """Not a difference: BatchNorm2d's samples are all 4-D and BatchNorm2d refuses 3-D and 5-D
    input with a ValueError, as the layers do (the layers' message gives the shape too)."""
    bn, m = _bn_and_layer(layer, 3)
    for shape in ((2, 3, 4), (2, 3, 4, 4, 4)):
        for module in (bn, m):
            for training in (True, False):
                module.train(training)
                with pytest.raises(ValueError, match=f'{len(shape)}D input'):
                    module(torch.randn(shape))


def test_difference_table_rows_are_wellformed():
    for name, row in DIFFERENCES.items():
        assert row.layers and set(row.layers) <= set(LAYERS), name
        assert all((row.case, row.bn, row.layer, row.reason)), name
    for (layer, desc), name in _REFUSED.items():
        assert desc in DESCS and layer in DIFFERENCES[name].layers


# ================================================================ a full window
# The checks again on conv + layer after WINDOW SGD steps (the window holds WINDOW - 1 past
# iterations), float64, against the composite reference: the past window the layer computed for
# this iteration (``past_window()``; compensated, or as recorded with compensate=False) as
# constants, plus the current batch's moments, in plain autograd
# (``window_batch_norm_reference``). BRN has no window: its samples above cover it.
WINDOW = 3
FULL_WINDOW_LAYERS = {
    'CBN': (CrossIterationBatchNorm2d, {}),
    'CBN-uncompensated': (CrossIterationBatchNorm2d, {'compensate': False}),
    'SyncCBN': (SyncCrossIterationBatchNorm2d, {}),
}


def _batch(seed, shape=(2, 3, 5, 4)):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, dtype=torch.float64, generator=gen) + 0.5).requires_grad_(True)


def _conv_model(layer, device=None):
    cls, options = FULL_WINDOW_LAYERS[layer]
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, device=device, dtype=torch.float64),
                         cls(4, window=WINDOW, **options, device=device, dtype=torch.float64))


def _full_window_model(layer):
    """conv + layer after ``WINDOW`` SGD steps: ``WINDOW - 1`` past iterations held."""
    torch.manual_seed(0)
    model = _conv_model(layer)
    model.layer = layer  # (a plain attribute, for _copies)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(WINDOW):
        model(_batch(10 + step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    assert model[1].history_length == WINDOW - 1
    return model


def _reference(model, x):
    """The composite reference: the window's past (as the layer computed it for this iteration,
    compensated or not) as constants, plus the current batch's moments, in plain autograd."""
    conv, norm = model
    past = norm.past_window()
    assert int(past['valid'].sum()) == WINDOW - 1
    if not norm.compensate:  # Naive CBN: the past is the recorded statistics
        assert torch.equal(past['mean_compensated'], past['mean'])
        assert torch.equal(past['var_compensated'], past['var'])
    y, _, _, mean, var, k = window_batch_norm_reference(
        conv(x), norm.weight, norm.bias, past['mean_compensated'], past['var_compensated'],
        past['valid'], norm.eps)
    return y, mean, var, past['count']


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_matches_composite_reference(layer):
    """Training: output, gradients (conv input, conv weight, γ, β), running statistics and
    state-dict keys against the reference; evaluation: BN with the running statistics."""
    model = _full_window_model(layer)
    norm = model[1]
    x = _batch(20)
    before_mean, before_var = norm.running_mean.clone(), norm.running_var.clone()
    y = model(x)
    y_ref, mean, var, past_count = _reference(model, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    if norm.compensate:
        # Eq. 7 is exact for a conv's mean (linear in θ): the past batches through today's conv
        past = norm.past_window()
        rows = past['mean_compensated'][past['valid'] > 0]
        exact = [model[0](_batch(10 + step)).mean((0, 2, 3)) for step in range(1, WINDOW)]
        assert sorted(min(range(len(exact)), key=lambda i: (row - exact[i]).abs().max())
                      for row in rows) == list(range(len(exact)))
        for row in rows:
            assert min((row - e).abs().max() for e in exact) < 1e-12
        assert not torch.allclose(past['mean_compensated'], past['mean'])  # it moved them
    g = torch.randn_like(y)
    inputs = (x, model[0].weight, model[0].bias, norm.weight, norm.bias)
    for a, b in zip(_grads(y, inputs, g), _grads(y_ref, inputs, g)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    n = past_count + x.shape[0] * x.shape[2] * x.shape[3]
    momentum = norm.momentum
    torch.testing.assert_close(norm.running_mean, (1 - momentum) * before_mean + momentum * mean)
    torch.testing.assert_close(norm.running_var,
                               (1 - momentum) * before_var + momentum * var * n / (n - 1))
    model.eval()
    bn = nn.BatchNorm2d(4).double().eval()
    _assert_keys(norm, bn, recorded=True)
    result = bn.load_state_dict(norm.state_dict(), strict=False)
    assert result.missing_keys == [] and result.unexpected_keys
    assert all(is_history_state_key(k) for k in result.unexpected_keys)
    torch.testing.assert_close(model(x), bn(model[0](x)), rtol=0, atol=0)


def _first_forward(model, x):
    """The first forward of the iteration (computes its past window), and its reference."""
    y = model(x)
    return y, _reference(model, x)[0]


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_factory_dtype_and_repr(layer):
    """``.float()`` converts parameters, buffers and the history, and the float32 model follows
    the float64 one; the repr is a fresh layer's (the history is state, not configuration)."""
    model = _full_window_model(layer)
    x = _batch(20)
    single = copy.deepcopy(model).float()
    floating = [t for t in [*single.parameters(), *single.buffers(),
                            *single.state_dict().values()] if t.dtype.is_floating_point]
    assert all(t.dtype == torch.float32 for t in floating)
    assert any(is_history_state_key(k) for k in single.state_dict())
    torch.testing.assert_close(single(x.float()), model(x).float(), rtol=1e-4, atol=1e-5)
    assert repr(model[1]) == repr(_conv_model(layer)[1])


def _copies(model):
    """The model through torch.save/torch.load, and a fresh model that loaded its state dict
    (strictly, after a weights_only round trip)."""
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copied = torch.load(buffer, weights_only=False)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    fresh = _conv_model(model.layer)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    return copied, fresh


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_save_load(layer):
    """Saved after the optimizer step (where checkpoints are saved), the unpickled model and a
    model that loaded the state dict normalise the next iteration as the original does."""
    model = _full_window_model(layer)
    copied, fresh = _copies(model)
    for x in (_batch(20), _batch(21)):  # the first call of the iteration and a later one
        y = model(x)
        torch.testing.assert_close(y, _reference(model, x)[0], rtol=1e-10, atol=1e-12)
        for other in (copied, fresh):
            torch.testing.assert_close(other(x), y, rtol=1e-12, atol=1e-12)
            assert other[1].history_length == model[1].history_length


@pytest.mark.parametrize('how', ['pickle', 'state_dict', 'deepcopy', 'double'])
def test_full_window_copy_between_calls_of_an_iteration(how):
    """The first call of an iteration writes its entry over the ring's oldest and keeps the
    iteration's past window for the later calls. A copy made between two calls continues the
    iteration as the original does: pickle and deepcopy carry that past window (the copy's conv
    weights, elsewhere in memory, are not taken for weights changed in place), the state dict
    saves it (``history_past_*``, only between two calls of one iteration), and ``.double()``
    moves it with the ring."""
    model = _full_window_model('CBN')
    past_keys = {'history_past_mean', 'history_past_var', 'history_past_valid',
                 'history_past_recorded', 'history_past_window'}
    assert not past_keys & set(model[1].state_dict())  # after a step: the ring alone
    model(_batch(20))
    assert past_keys <= set(model[1].state_dict())
    x = _batch(21)
    copied, fresh = _copies(model)
    other = {'pickle': copied, 'state_dict': fresh, 'deepcopy': copy.deepcopy(model),
             'double': model}[how]
    y = model(x)
    if how == 'double':
        model.double()  # the same again for a later call, with the same past window
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no 'weights changed between two calls' either
        torch.testing.assert_close(other(x), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_non_contiguous_and_channels_last(layer):
    """A non-contiguous conv input (the layer reads it for ∂μ/∂θ), a channels_last input and
    model: the contiguous outputs, gradients and recorded history entry."""
    results = []
    for variant in ('contiguous', 'non-contiguous', 'channels_last'):
        model = _full_window_model(layer)
        x = _batch(20)
        inp = {'contiguous': x, 'non-contiguous': _non_contiguous(x),
               'channels_last': x.detach().to(memory_format=torch.channels_last).requires_grad_()
               }[variant]
        if variant == 'channels_last':
            model.to(memory_format=torch.channels_last)
        y = model(inp)
        if variant == 'channels_last':
            assert y.is_contiguous(memory_format=torch.channels_last)
        grads = _grads(y, (inp, *model.parameters()), torch.ones_like(y) + y.detach())
        entry = model[1].history.entries()[0]  # the current iteration's (open) entry
        results.append((y, grads, entry.mean, entry.var, entry.var_grad))
    for other in results[1:]:
        for a, b in zip(torch.utils._pytree.tree_leaves(results[0]),
                        torch.utils._pytree.tree_leaves(other)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize('check', [torch.autograd.gradcheck, torch.autograd.gradgradcheck],
                         ids=['gradcheck', 'gradgradcheck'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_gradients(layer, training, check):
    """gradcheck/gradgradcheck wrt the conv input and γ, β, with the past window fixed by the
    iteration's first forward. (Not wrt the conv weight: the compensated past depends on it but
    receives no gradient, by design (Sec. 3.3); the composite test checks that gradient.)"""
    model = _full_window_model(layer)
    x = _batch(20, shape=(2, 3, 3, 3))
    model.train(training)
    model(x)
    norm = model[1]

    def fn(inp, *params):
        return model(inp)

    assert check(fn, (x, norm.weight, norm.bias), nondet_tol=0.0)
    if training:  # every call of the iteration used the whole window
        assert int(norm.past_window()['valid'].sum()) == WINDOW - 1


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_meta_and_to_empty(layer):
    """A model built on the meta device, ``to_empty(device='cpu')``, then the trained state dict:
    normalises the next batch as the trained model."""
    model = _full_window_model(layer)
    with torch.device('meta'):
        meta = _conv_model(layer)
    assert all(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    meta.to_empty(device='cpu')
    meta.load_state_dict(model.state_dict())
    x = _batch(20)
    torch.testing.assert_close(meta(x), model(x), rtol=1e-12, atol=1e-12)
    assert meta[1].past_window()['valid'].sum() == WINDOW - 1


@pytest.mark.parametrize('layer', list(FULL_WINDOW_LAYERS))
def test_full_window_train_eval_switching(layer):
    """Evaluation in the middle of an iteration is BN with the running statistics and leaves the
    window alone: back in training, the next call normalises with the same past."""
    model = _full_window_model(layer)
    norm = model[1]
    x, x2 = _batch(20), _batch(21)
    y, y_ref = _first_forward(model, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-12)
    past = {k: v.clone() for k, v in norm.past_window().items()}
    model.eval()
    bn = nn.BatchNorm2d(4).double().eval()
    bn.load_state_dict(norm.state_dict(), strict=False)
    torch.testing.assert_close(model(x2), bn(model[0](x2)), rtol=0, atol=0)
    model.train()
    torch.testing.assert_close(model(x2), _reference(model, x2)[0], rtol=1e-10, atol=1e-12)
    for key, value in norm.past_window().items():
        assert torch.equal(value, past[key]), key


# ================================================================ deployment
def _trained_eval_model(cls):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), cls(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), cls(4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(3):
        model(_batch(30 + step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


DEPLOY_LAYERS = [CrossIterationBatchNorm2d, SyncCrossIterationBatchNorm2d, BatchRenorm2d]


@pytest.mark.parametrize('cls', DEPLOY_LAYERS, ids=lambda c: c.__name__)
def test_export_and_trace_of_an_eval_model_equal_eager(cls):
    model = _trained_eval_model(cls)
    x, other = _batch(40).detach(), _batch(41, shape=(3, 3, 6, 7)).detach()
    with torch.no_grad():
        eager = model(x)
        exported = torch.export.export(model, (x, )).module()
        torch.testing.assert_close(exported(x), eager, rtol=0, atol=0)
        with warnings.catch_warnings():
            # like BN's, no tracer warning (the layers' channel check stands aside while tracing)
            warnings.simplefilter('error', torch.jit.TracerWarning)
            traced = torch.jit.trace(model, (x, ))
        torch.testing.assert_close(traced(x), eager, rtol=0, atol=0)
        torch.testing.assert_close(traced(other), model(other), rtol=0, atol=0)


@pytest.mark.parametrize('cls', DEPLOY_LAYERS, ids=lambda c: c.__name__)
def test_torchscript_refuses_with_the_ways_to_deploy_and_the_bn_route_scripts(cls):
    """torch.jit.script names the alternatives (row 'torchscript'); the BN route it names works:
    the published weights (history dropped) load strictly into the BN model, which scripts and
    equals the eager model in evaluation."""
    model = _trained_eval_model(cls)
    with pytest.raises(RuntimeError, match='tools/model_converters/publish_model.py'):
        torch.jit.script(model)
    published = {k: v for k, v in model.state_dict().items() if not is_history_state_key(k)}
    bn_model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                             nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4)).double().eval()
    bn_model.load_state_dict(published)
    scripted = torch.jit.script(bn_model)
    x = _batch(40).detach()
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), model(x), rtol=0, atol=0)


# ================================================================ an input sweep
# Inputs beyond the samples (dtype, device, shape, channel count, empty, non-finite), given to a
# fresh layer and to one that has trained behind a conv (CBN and SyncCBN with a full window), in
# training and evaluation, each next to BatchNorm2d given the same input: an input BN refuses is
# refused with the same exception type, or with the error of a DIFFERENCES row that names the
# layer and the setting; an input BN takes gives an output of BN's shape, dtype and finite values;
# a refused input changes no state.
def _sweep_input(case):
    x = _batch(30, shape=(2, 4, 5, 4)).detach()
    return {
        'int64': lambda: x.long(),
        'bool': lambda: x > 0,
        'complex128': lambda: x.to(torch.complex128),
        'float32 into a float64 layer': lambda: x.float(),
        'float16 into a float64 layer': lambda: x.half(),
        'meta device': lambda: x.to('meta'),
        '3 channels': lambda: x[:, :3],
        '3-D': lambda: x[0],
        '5-D': lambda: x[..., None],
        'empty batch': lambda: x[:0],
        'empty plane': lambda: x[:, :, :0],
        'one value per channel': lambda: x[:1, :, :1, :1],
        'all inf': lambda: torch.full_like(x, float('inf')),
        'inf and -inf': lambda: torch.full_like(x, float('inf')).where(x > 0, float('-inf')),
        'one NaN': lambda: x.index_put((torch.tensor(0), torch.tensor(2)), x.new_tensor(float('nan'))),
    }[case]()


SWEEP_CASES = ['int64', 'bool', 'complex128', 'float32 into a float64 layer',
               'float16 into a float64 layer', 'meta device', '3 channels', '3-D', '5-D',
               'empty batch', 'empty plane', 'one value per channel', 'all inf', 'inf and -inf',
               'one NaN']
_OWNER = {'CBN': 'CBN', 'CBN-uncompensated': 'CBN', 'SyncCBN': 'SyncCBN', 'BRN': 'BRN'}


def _trained_brn():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), BatchRenorm2d(4)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(WINDOW):
        model(_batch(10 + step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model


def _sweep_layer(layer, trained):
    if not trained:
        return (LAYERS[_OWNER[layer]] if layer != 'CBN-uncompensated' else
                lambda c, **kw: CrossIterationBatchNorm2d(c, compensate=False, **kw))(
                    4, dtype=torch.float64)
    return (_trained_brn() if layer == 'BRN' else _full_window_model(layer))[1]


def _layer_error(layer, case, training):
    """The error the layer gives where it does not give BN's: (type, message pattern) or None."""
    owner = _OWNER[layer]
    if case == '3 channels':  # row 'channel_error'
        return ValueError, rf'^{owner} expected input with 4 channels \(num_features\), got 3'
    if case in ('3-D', '5-D'):
        return ValueError, rf'^{owner} expects 4D \(N, C, H, W\) input'
    if not training:  # evaluation is BN's forward (BN's errors, row 'dtype_error')
        return None
    if case == 'meta device':
        return RuntimeError, rf'^{owner} input is on meta but the layer is on cpu'
    if case in ('int64', 'bool', 'complex128') or 'into a float64 layer' in case:
        dtype = str(_sweep_input(case).dtype)
        return TypeError, (rf'^{owner} input dtype {dtype} does not match the layer dtype '
                           r'torch.float64 \(allowed: the same dtype, or float16/bfloat16 input with '
                           r'a float32 layer\)')
    return None


def _outcome(module, x):
    try:
        return module(x), None
    except Exception as error:  # noqa: BLE001  (compared with BN's)
        return None, error


@pytest.mark.filterwarnings('ignore::UserWarning')
@pytest.mark.parametrize('case', SWEEP_CASES)
@pytest.mark.parametrize('trained', [False, True], ids=['fresh', 'trained'])
@pytest.mark.parametrize('training', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('layer', ['CBN', 'CBN-uncompensated', 'SyncCBN', 'BRN'])
def test_input_sweep_against_batchnorm(layer, training, trained, case):
    m = _sweep_layer(layer, trained).train(training)
    bn = nn.BatchNorm2d(4).double().train(training)
    bn.load_state_dict({k: v for k, v in m.state_dict().items() if not is_history_state_key(k)})
    iteration_clock.next_iteration()
    before = copy.deepcopy(m.state_dict())
    x = _sweep_input(case)
    y_bn, bn_error = _outcome(bn, x)
    y, error = _outcome(m, x)
    expected = _layer_error(layer, case, training)
    if expected is not None:
        assert error is not None, f'{layer} took {case} input'
        assert isinstance(error, expected[0]) and re.search(expected[1], str(error)), repr(error)
        assert bn_error is not None or case == '3 channels'  # BN refuses it too (row aside)
    elif bn_error is not None:
        assert type(error) is type(bn_error), (repr(error), repr(bn_error))
    else:
        assert error is None, repr(error)
        assert y.shape == y_bn.shape and y.dtype == y_bn.dtype and y.device == y_bn.device
        if y.device.type != 'meta':
            assert torch.equal(torch.isfinite(y), torch.isfinite(y_bn))
            if not training or not trained:
                # evaluation is BN's; fresh, CBN's window is empty and BRN's r = 1, d = 0
                torch.testing.assert_close(y, y_bn, rtol=1e-12, atol=1e-12, equal_nan=True)
    state = m.state_dict()
    if error is not None or case in ('empty batch', 'empty plane') or not training:
        # nothing changes (row 'empty_batch_not_counted': an empty batch is not counted)
        assert list(state) == list(before)
        for key in before:
            assert torch.equal(state[key], before[key]), key
    elif not torch.isfinite(x).all():  # row 'non_finite_batch'
        for key in ('running_mean', 'running_var', 'num_batches_tracked'):
            assert torch.equal(state[key], before[key]), key
        if layer in RECORDS_HISTORY or layer == 'CBN-uncompensated':
            entries = m.history.entries()
            assert float(entries[0].count) == 0.0 and not torch.isfinite(y_bn).all()
            assert all(torch.isfinite(e.mean).all() and torch.isfinite(e.var).all()
                       for e in entries)
