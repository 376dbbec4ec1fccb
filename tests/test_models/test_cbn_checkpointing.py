"""Activation checkpointing: training through torch.utils.checkpoint (reentrant and not) and mmdet's
``with_cp=True`` equals training without it: losses, gradients, parameters, running statistics and
history, step by step (float64)."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN


class Block(nn.Module):
    """A bottleneck-like residual block with a downsample branch, checkpointed as one region."""

    def __init__(self, cin, cout, stride, mode):
        super().__init__()
        self.mode = mode
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 1, bias=False), CBN(cout, window=3)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, stride, 1, bias=False), CBN(cout, window=3)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), CBN(cout, window=3))

    def _inner(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return out + self.down(x)

    def forward(self, x):
        if self.mode == 'plain':
            out = self._inner(x)
        else:
            out = checkpoint(self._inner, x, use_reentrant=self.mode == 'reentrant')
        return F.relu(out)


def _model(mode):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3), nn.ReLU(),
                         Block(4, 8, 2, mode), Block(8, 8, 1, mode),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3)).double()


def _set_mode(model, mode):
    for m in model.modules():
        if isinstance(m, Block):
            m.mode = mode


def _run(model, steps=4):
    """SGD steps on fixed data; returns per-step losses and gradients, and the final state."""
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    record = []
    for _ in range(steps):
        x = torch.randn(2, 3, 12, 12, dtype=torch.float64, generator=gen) + 0.5
        target = torch.randint(0, 3, (2, ), generator=gen)
        loss = F.cross_entropy(model(x), target)
        opt.zero_grad()
        loss.backward()
        record.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    return record, {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same(run, ref):
    (record, state), (ref_record, ref_state) = run, ref
    for (loss, grads), (ref_loss, ref_grads) in zip(record, ref_record):
        torch.testing.assert_close(loss, ref_loss, rtol=1e-12, atol=1e-12)
        for g, r in zip(grads, ref_grads):
            torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    assert state.keys() == ref_state.keys()
    for key in ref_state:
        torch.testing.assert_close(state[key], ref_state[key], rtol=1e-10, atol=1e-12, msg=key)


@pytest.fixture(scope='module')
def reference():
    model = _model('plain')
    run = _run(model)
    assert all(m.history_length == 2 for m in model.modules() if isinstance(m, CBN))
    assert all(m.last_bind_status == 'conv' for m in model.modules() if isinstance(m, CBN))
    return run


@pytest.mark.parametrize('detection', ['hook_reader', 'frames'])
@pytest.mark.parametrize('mode,early_stop', [('reentrant', True), ('non_reentrant', True),
                                             ('non_reentrant', False)])
def test_checkpointed_training_equals_plain(reference, monkeypatch, mode, early_stop, detection):
    """Also with the frame-based detection of the first pass that torch < 2.8 uses."""
    from cbn_mmdet.models import conv_binding
    if detection == 'frames':
        monkeypatch.setattr(conv_binding, 'saved_tensor_hooks_accessor', lambda: None)
    elif conv_binding.saved_tensor_hooks_accessor() is None:
        pytest.skip('this torch has no reader of the saved-tensor hooks')
    model = _model(mode)
    with set_checkpoint_early_stop(early_stop):
        run = _run(model)
    _assert_same(run, reference)


def test_checkpointing_switched_on_mid_training_and_after_loading(reference):
    """A reentrant first pass before any recorded forward of this process (a resumed run) uses the
    loaded past without compensation for that one iteration, consistently in both passes; from the
    next iteration on it equals the plain run again."""
    plain = _model('plain')
    _run(plain, steps=2)
    resumed = copy.deepcopy(_model('reentrant'))
    resumed.load_state_dict(plain.state_dict())
    assert all(m.history_length == 2 for m in resumed.modules() if isinstance(m, CBN))
    for m in resumed.modules():
        if isinstance(m, CBN):
            assert m.last_bind_status is None
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    with pytest.warns(UserWarning, match='without compensation'):
        out = resumed(x)
    out.sum().backward()  # the recomputation replays the same (uncompensated) window
    bn2 = resumed[3].bn2
    assert bn2.history_length == 2 and bn2.last_bind_status == 'conv'


def test_no_grad_training_forward_normalises_like_training_and_changes_nothing():
    model = _model('plain')
    _run(model, steps=2)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    with torch.no_grad():
        out_no_grad = model(x)
    for key, value in model.state_dict().items():
        if not key.endswith('history_index'):
            assert torch.equal(value, state[key]), key
    out = model(x)  # same iteration, recorded: the same normalisation
    torch.testing.assert_close(out_no_grad, out.detach(), rtol=1e-12, atol=1e-12)


def _mmdet_resnet_run(with_cp, steps=3):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(0)
    model = ResNet(depth=50, base_channels=16, norm_cfg=dict(type='CBN', window=3), norm_eval=False,
                   frozen_stages=-1, with_cp=with_cp, out_indices=(0, 1, 2, 3)).double()
    model.init_weights()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(2)
    record = []
    for _ in range(steps):
        x = torch.randn(2, 3, 64, 64, dtype=torch.float64, generator=gen)
        loss = sum((f * torch.randn(f.shape, dtype=f.dtype, generator=gen)).mean()
                   for f in model(x))
        opt.zero_grad()
        loss.backward()
        record.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
        opt.step()
    norms = [m for m in model.modules() if isinstance(m, CBN)]
    assert len(norms) == 53 and all(m.last_bind_status == 'conv' for m in norms)
    assert all(m.history_length == 2 for m in norms)
    return record, {k: v.clone() for k, v in model.state_dict().items()}


def test_mmdet_resnet_with_cp_equals_without():
    """mmdet's ResNet-50 with ``with_cp=True`` (reentrant torch.utils.checkpoint per bottleneck) and
    CBN in every norm layer trains exactly like ``with_cp=False``."""
    pytest.importorskip('mmdet')
    import cbn_mmdet  # noqa: F401  (registers CBN)
    import warnings
    with warnings.catch_warnings():
        warnings.filterwarnings('ignore', message='.*use_reentrant.*')
        _assert_same(_mmdet_resnet_run(True), _mmdet_resnet_run(False))


def test_layer_keeps_no_activation_alive_between_iterations():
    """What a pass without autograd reuses (the bound conv) holds weights only, not the conv input."""
    import gc
    import weakref
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3)
    x = torch.randn(2, 3, 8, 8).relu()
    ref = weakref.ref(x)
    norm(conv(x)).sum().backward()
    del x
    gc.collect()
    assert ref() is None


def test_no_grad_pass_follows_the_parameter_and_warns_only_for_computed_weights():
    """A pass without autograd compensates to the conv parameter's current value, also after the
    module was moved (``.double()`` replaces parameter storage); a weight computed from parameters
    (weight standardisation) warns that its last recorded value is used."""
    import warnings
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3)
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.1)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        norm(conv(x)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    conv.double(), norm.double()
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        with torch.no_grad():
            out = norm(conv(x.double()))
    torch.testing.assert_close(out, norm(conv(x.double())).detach())  # same window with autograd

    class StandardisedConv(nn.Conv2d):
        def forward(self, inp):
            w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
            return nn.functional.conv2d(inp, w, self.bias, self.stride, self.padding)

    ws_conv, ws_norm = StandardisedConv(3, 4, 3, padding=1), CBN(4, window=3)
    ws_norm(ws_conv(x)).sum().backward()
    with pytest.warns(UserWarning, match='computed from parameters'), torch.no_grad():
        ws_norm(ws_conv(x))
