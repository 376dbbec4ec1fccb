"""CBN, SyncCBN and BRN take BN's whole constructor: BN's positional order (device, dtype included),
the keyword-only ``bias`` (γ without β), BN state dicts with and without ``bias``, the option list."""
import copy
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet import options
from cbn_mmdet.models import (BatchRenorm2d as BRN, CrossIterationBatchNorm2d as CBN,
                              SyncCrossIterationBatchNorm2d as SyncCBN, convert_to_cbn,
                              convert_to_sync_cbn)
from cbn_mmdet.ops import window_norm

import cuda_batch_norm_kernels as cuda_standins  # noqa: E402

C = 5
LAYERS = [CBN, SyncCBN, BRN]
OWNER = {CBN: 'CBN', SyncCBN: 'SyncCBN', BRN: 'BRN'}
#: each layer's first option after BN's arguments, and a value other than its default
FIRST_OWN = {CBN: ('window', 3), SyncCBN: ('window', 3), BRN: ('rmax', 2.0)}
#: settings under which training uses more than the current batch (a full window; BRN's r and d)
TRAINING = {CBN: dict(window=3), SyncCBN: dict(window=3),
            BRN: dict(rmax=2.0, dmax=0.5, warmup_iters=0, rmax_iters=1, dmax_iters=1)}
needs_bias = pytest.mark.skipif(not options.NORM_TAKES_BIAS,
                                reason="this torch's BatchNorm has no bias argument")
# SyncCBN outside a distributed run is CBN, and says so once
one_process = pytest.mark.filterwarnings('ignore:.*outside a distributed run:UserWarning')


def _torch_bn_takes_bias() -> bool:
    try:
        nn.BatchNorm2d(2, bias=False)
    except TypeError:
        return False
    return True


def _randomise(*norms, seed=0):
    """The same γ (and β where there is one) in every layer, away from BN's 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.empty(C, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)
    bias = torch.empty(C, dtype=torch.float64).uniform_(-0.5, 0.5, generator=gen)
    with torch.no_grad():
        for norm in norms:
            norm.weight.copy_(weight)
            if norm.bias is not None:
                norm.bias.copy_(bias)


def _batches(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn((4, 3, 6, 5), dtype=torch.float64, generator=gen) + 0.5 for _ in range(n)]


# ---------------------------------------------------------------- BN's positional order
@pytest.mark.parametrize('affine', [True, False])
@pytest.mark.parametrize('cls', LAYERS)
def test_bn_positional_order_equals_keywords(cls, affine):
    name, value = FIRST_OWN[cls]
    positional = cls(C, 1e-3, 0.2, affine, True, 'cpu', torch.float64, value)
    keywords = cls(C, eps=1e-3, momentum=0.2, affine=affine, track_running_stats=True, device='cpu',
                   dtype=torch.float64, **{name: value})
    assert getattr(positional, name) == value
    assert repr(positional) == repr(keywords)
    assert positional.state_dict().keys() == keywords.state_dict().keys()
    for (key, a), b in zip(positional.state_dict().items(), keywords.state_dict().values()):
        assert a.dtype == b.dtype and a.device == b.device and torch.equal(a, b), key


@pytest.mark.parametrize('cls', LAYERS)
def test_device_and_dtype_positionally_as_in_bn(cls):
    norm = cls(64, 1e-5, 0.1, True, True, 'cpu', torch.float64)
    for key, t in norm.state_dict().items():
        assert t.device == torch.device('cpu'), key
        assert t.dtype == (torch.long if key == 'num_batches_tracked' else torch.float64), key
    assert norm.weight.dtype == norm.bias.dtype == torch.float64 and norm.weight.requires_grad


# ---------------------------------------------------------------- bias=False: γ without β
def test_bias_support_is_detected():
    assert options.NORM_TAKES_BIAS == _torch_bn_takes_bias()


@needs_bias
@pytest.mark.parametrize('cls', LAYERS)
def test_bias_false_learns_a_scale_and_no_shift(cls):
    norm, bn = cls(C, bias=False), nn.BatchNorm2d(C, bias=False)
    assert norm.bias is None and isinstance(norm.weight, nn.Parameter) and norm.weight.requires_grad
    assert [name for name, _ in norm.named_parameters()] == ['weight']
    assert set(norm.state_dict()) == set(bn.state_dict())
    shown = 'affine=True, bias=False, track_running_stats=True'  # as torch's BN shows it
    assert shown in repr(bn) and shown in repr(norm)
    assert 'bias=True' in repr(cls(C))


@needs_bias
@one_process
@pytest.mark.parametrize('cls', LAYERS)
def test_first_training_forward_equals_bn_without_bias(cls):
    """An empty window (CBN) and r = 1, d = 0 (BRN before its first update) are BN: outputs, the
    gradients of the input, the conv and γ, and the running statistics."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1).double()
    conv_ref = copy.deepcopy(conv)
    norm = cls(C, bias=False, **TRAINING[cls]).double()
    bn = nn.BatchNorm2d(C, bias=False).double()
    _randomise(norm, bn)
    x = _batches(1)[0].requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = norm(conv(x)), bn(conv_ref(x_ref))
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(y, y_ref, **tol)
    for got, want in ((x.grad, x_ref.grad), (conv.weight.grad, conv_ref.weight.grad),
                      (conv.bias.grad, conv_ref.bias.grad), (norm.weight.grad, bn.weight.grad)):
        torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(norm.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(norm.running_var, bn.running_var, **tol)


@needs_bias
@one_process
@pytest.mark.parametrize('cls', LAYERS)
def test_trains_and_evaluates_without_bias(cls):
    """bias=False behind a conv, 4 SGD steps (CBN's window of 3 fills; BRN's r and d clip), then
    evaluation: the same as the layer with a bias held at zero, step by step."""
    _train_and_evaluate_like_a_zero_bias(cls)


@needs_bias
@pytest.mark.parametrize('channels_last', [False, True])
def test_cuda_backward_without_bias(monkeypatch, channels_last):
    """CBN's CUDA backward branch (through the stand-ins of its kernels) without β: as with a zero
    β, and as the CPU branch."""
    monkeypatch.setattr(window_norm.cuda_kernels, 'applies', lambda x: True)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_reduce', cuda_standins.backward_reduce)
    monkeypatch.setattr(window_norm.cuda_kernels, 'backward_elemt', cuda_standins.backward_elemt)
    cuda = _train_and_evaluate_like_a_zero_bias(CBN, channels_last)
    monkeypatch.setattr(window_norm.cuda_kernels, 'applies', lambda x: False)
    cpu = _train_and_evaluate_like_a_zero_bias(CBN, channels_last)
    assert len(cuda) == len(cpu) == 13
    for a, b in zip(cuda, cpu):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def _train_and_evaluate_like_a_zero_bias(cls, channels_last=False):
    """Asserts the bias=False layer behaves as one whose β stays 0; returns its outputs and the
    gradients of the conv and γ at each step, and the evaluation output."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, C, 3, padding=1).double()
    conv_ref = copy.deepcopy(conv)
    norm = cls(C, bias=False, **TRAINING[cls]).double()
    ref = cls(C, **TRAINING[cls]).double()  # its β stays 0: not in the optimizer
    _randomise(norm, ref)
    with torch.no_grad():
        ref.bias.zero_()
    # one optimizer: one step of the iteration clock per iteration for both models
    opt = torch.optim.SGD([*conv.parameters(), norm.weight, *conv_ref.parameters(), ref.weight],
                          lr=0.2)
    tol = dict(rtol=1e-10, atol=1e-10)
    seen = []
    for x in _batches(4, seed=1):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y, y_ref = norm(conv(x)), ref(conv_ref(x))
        torch.testing.assert_close(y, y_ref, **tol)
        (y.square().mean() + y.mean()).backward()
        (y_ref.square().mean() + y_ref.mean()).backward()
        for got, want in ((conv.weight.grad, conv_ref.weight.grad),
                          (norm.weight.grad, ref.weight.grad)):
            torch.testing.assert_close(got, want, **tol)
        seen += [y.detach(), conv.weight.grad.clone(), norm.weight.grad.clone()]
        opt.step()
        opt.zero_grad()
    if cls is BRN:
        assert norm.current_limits == (2.0, 0.5)
    else:
        assert norm.past_window()['valid'].sum() == 2  # the last step used the full window
    assert norm.bias is None and not torch.equal(norm.weight, torch.ones_like(norm.weight))
    torch.testing.assert_close(norm.running_mean, ref.running_mean, **tol)
    torch.testing.assert_close(norm.running_var, ref.running_var, **tol)

    norm.eval()
    ref.eval()
    x = _batches(1, seed=2)[0]
    with torch.no_grad():
        features = conv(x)
        y = norm(features)
        torch.testing.assert_close(y, ref(conv_ref(x)), **tol)
        # evaluation is BN with the running statistics, γ and no β
        torch.testing.assert_close(y, F.batch_norm(features, norm.running_mean, norm.running_var,
                                                   norm.weight, None, False, 0.0, norm.eps),
                                   rtol=1e-12, atol=1e-12)
    return seen + [y]


# ---------------------------------------------------------------- BN state dicts
@needs_bias
@pytest.mark.parametrize('bias', [True, False])
@pytest.mark.parametrize('cls', LAYERS)
def test_bn_state_dicts_load_strictly_with_the_matching_bias(cls, bias):
    bn = nn.BatchNorm2d(C, bias=bias)
    _randomise(bn)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(7)
    norm = cls(C, bias=bias)
    assert not norm.load_state_dict(bn.state_dict(), strict=True).missing_keys
    for key, t in bn.state_dict().items():
        assert torch.equal(norm.state_dict()[key], t), key
    # and back: the layer's own state dict into a fresh one
    cls(C, bias=bias).load_state_dict(norm.state_dict(), strict=True)
    other = cls(C, bias=not bias)
    with pytest.raises(RuntimeError, match='Unexpected key.*"bias"' if bias else
                       'Missing key.*"bias"'):
        other.load_state_dict(bn.state_dict(), strict=True)


@needs_bias
@pytest.mark.parametrize('convert', [convert_to_cbn, convert_to_sync_cbn])
def test_converters_keep_a_bn_without_bias(convert):
    model = nn.Sequential(nn.Conv2d(3, C, 3), nn.BatchNorm2d(C, bias=False))
    if convert is convert_to_sync_cbn:
        convert_to_cbn(model)
    weight = model[1].weight
    convert(model)
    assert type(model[1]) is (SyncCBN if convert is convert_to_sync_cbn else CBN)
    assert model[1].bias is None and model[1].weight is weight
    assert 'bias=False' in repr(model[1])


@needs_bias
@pytest.mark.parametrize('cls', LAYERS)
def test_bias_through_build_norm_layer(cls):
    """mmcv calls ``cls(num_features, **cfg)``: norm_cfg takes ``bias`` like BN's."""
    from mmcv.cnn import build_norm_layer
    name, layer = build_norm_layer(dict(type=OWNER[cls], bias=False, **TRAINING[cls]), C)
    assert type(layer) is cls and name == 'bn' and layer.bias is None
    assert layer.weight.requires_grad


# ---------------------------------------------------------------- errors
@pytest.mark.parametrize('cls', LAYERS)
def test_unknown_option_lists_bias_and_not_device_or_dtype(cls):
    with pytest.raises(TypeError, match=f'{OWNER[cls]} got unknown option') as err:
        cls(C, biass=False)
    allowed = re.findall(r'\w+', str(err.value).split('allowed: ')[1])
    assert 'bias' in allowed and FIRST_OWN[cls][0] in allowed and 'track_running_stats' in allowed
    assert 'device' not in allowed and 'dtype' not in allowed


@pytest.mark.parametrize('cls', LAYERS)
def test_bias_must_be_a_bool(cls):
    with pytest.raises(TypeError, match=f'{OWNER[cls]} bias must be True or False'):
        cls(C, bias='no')


@pytest.mark.parametrize('cls', LAYERS)
def test_bias_false_is_refused_where_torch_has_no_bias_argument(cls, monkeypatch):
    monkeypatch.setattr(options, 'NORM_TAKES_BIAS', False)
    assert options.bn_bias_kwargs('CBN', True) == {}  # nothing passed to an older torch's BN
    with pytest.raises(ValueError, match=rf'{OWNER[cls]} bias must be True with torch '
                       rf'{re.escape(torch.__version__)}.*needs a newer torch.*got False'):
        cls(C, bias=False)
    assert cls(C, bias=True).bias is not None
