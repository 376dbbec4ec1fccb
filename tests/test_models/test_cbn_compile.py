"""torch.compile: a model with CBN compiles into one graph with the layers inside (no graph break),
trains exactly like eager (float64, aot_eager: outputs, gradients, history, running statistics),
and recompiles only when the layer's mode changes (burn-in, first window, window size)."""
import warnings

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN

pytest.importorskip('torch._dynamo')
pytestmark = pytest.mark.skipif(
    tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 4),
    reason='torch 2.1 under torch.compile skips the global optimizer step hooks that advance '
           "CBN's iteration clock (docs/user_guide/modes.md)")


class ConvNorm(nn.Module):
    """conv + CBN + ReLU, like mmcv's ConvModule."""

    def __init__(self, cin, cout, groups=1, bias=True, window=4):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, groups=groups, bias=bias)
        self.norm = CBN(cout, window=window)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def _model(dtype=torch.float64):
    torch.manual_seed(0)
    return nn.Sequential(ConvNorm(3, 4), nn.Conv2d(4, 4, 1), nn.GELU(),
                         ConvNorm(4, 4, groups=2, bias=False), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 2)).to(dtype)


def _norms(model):
    return [m for m in model.modules() if isinstance(m, CBN)]


def _burn_in_then_shrink(step, norm):
    """Plain BN for two steps (burn-in), then the full window; from step 7 a window of 3."""
    if step == 7:
        norm.set_window(3)
    norm.active_window = 1 if step < 2 else norm.window


def _train(model, forward, steps=10, schedule=_burn_in_then_shrink, dtype=torch.float64):
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    gen = torch.Generator().manual_seed(1)
    outs, grads = [], []
    for step in range(steps):
        for norm in _norms(model):
            schedule(step, norm)
        out = forward(torch.randn(2, 3, 8, 8, generator=gen, dtype=dtype))
        out.square().sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs, grads


def _graphs():
    return torch._dynamo.utils.counters['stats']['unique_graphs']


def test_compiled_training_equals_eager_and_recompiles_only_on_mode_changes():
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    ref_outs, ref_grads = _train(eager, eager)
    before = _graphs()
    outs, grads = _train(compiled, torch.compile(compiled, backend='aot_eager'))
    for step, (a, b) in enumerate(zip(outs, ref_outs)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f'output, step {step}')
    for step, (ga, gb) in enumerate(zip(grads, ref_grads)):
        for a, b in zip(ga, gb):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=f'gradient, step {step}')
    state = compiled.state_dict()
    assert any('history_var_grad' in key for key in state)
    for key, value in eager.state_dict().items():  # history (and its cursor), running statistics
        torch.testing.assert_close(state[key], value, rtol=1e-12, atol=1e-12, msg=key)
    assert [m.last_bind_status for m in _norms(compiled)] == ['conv', 'conv']
    assert [m.history_length for m in _norms(compiled)] == [2, 2]
    # burn-in (BN), the first window iteration (the ring is allocated), the window in steady state,
    # the window of 3: one graph each, not one per step or per ring position
    assert _graphs() - before == 4


def test_compiled_model_has_no_graph_break():
    torch._dynamo.reset()
    model = _model(torch.float32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(3):  # a full window of 4 is not needed: the layer's path is the same from here
        model(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    assert [m.last_bind_status for m in _norms(model)] == ['conv', 'conv']


def test_traced_layer_compensates_like_eager_through_the_conv_tap():
    """The binding of a traced forward comes from the conv registered before the layer."""
    torch._dynamo.reset()
    model = _model(torch.float32)
    assert all(m._conv_tap is not None and m._conv_tap.conv is block.conv
               for block, m in zip((model[0], model[3]), _norms(model)))
    torch.compile(model, backend='aot_eager')(torch.randn(2, 3, 8, 8))
    # the tap forgets the tensors it handed over (no activation kept between steps)
    assert all(m._conv_tap.input is None and m._conv_tap.output is None for m in _norms(model))


def test_compiled_model_with_eager_producer_convs_equals_eager():
    """Convs kept eager inside a compiled model (torch.compiler.disable): the same results."""
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    for block in (compiled[0], compiled[3]):
        block.conv.forward = torch.compiler.disable(block.conv.forward)
    ref, _ = _train(eager, eager, steps=6)
    got, _ = _train(compiled, torch.compile(compiled, backend='aot_eager'), steps=6)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert [m.last_bind_status for m in _norms(compiled)] == ['conv', 'conv']


def test_second_forward_of_an_iteration_is_refused_under_compile():
    """Pooling two forwards into one entry is eager-only: refused, with the reason, not approximated."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4, window=3))
    compiled = torch.compile(model, backend='aot_eager')
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(2):
        compiled(torch.randn(2, 3, 8, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    compiled(torch.randn(2, 3, 8, 8))
    with pytest.raises(RuntimeError, match='second training forward of this iteration'):
        compiled(torch.randn(2, 3, 8, 8))


def test_only_the_conv_compiled_is_refused():
    torch._dynamo.reset()
    conv, norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3)
    with pytest.raises(RuntimeError, match='compiled only the conv'):
        norm(torch.compile(conv, backend='aot_eager')(torch.randn(2, 3, 8, 8)))


def test_fallback_under_compile_warns_at_the_next_step_without_a_graph_break():
    """A CBN whose input is not a conv's output: BN's fallback, told at the optimizer step (a
    warning while tracing would break the graph)."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), CBN(4, window=3))
    explained = torch._dynamo.explain(model)(torch.randn(2, 3, 8, 8))
    assert explained.graph_break_count == 0
    assert model[2].last_bind_status == 'not_conv' and model[2].history_length == 0
    with pytest.warns(UserWarning, match="no 2-D conv .*fallback='bn'"):
        torch.optim.SGD(model.parameters(), lr=0.1).step()


def test_tap_follows_the_layer_registered_last_and_survives_deepcopy():
    import copy
    conv = nn.Conv2d(3, 4, 3)
    first = nn.Sequential(conv, CBN(4))
    assert first[1]._conv_tap.conv is conv and len(conv._forward_hooks) == 1
    first[1] = CBN(4)  # replaced in place (convert_to_cbn does this): one tap, the new layer's
    assert first[1]._conv_tap.conv is conv and len(conv._forward_hooks) == 1
    clone = copy.deepcopy(first)
    assert clone[1]._conv_tap.conv is clone[0]
    assert list(clone[0]._forward_hooks.values())[0] is clone[1]._conv_tap
    assert nn.Sequential(nn.Conv2d(3, 5, 3), CBN(4))[1]._conv_tap is None  # channels differ
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        first(torch.randn(2, 3, 8, 8))  # eager: the tap keeps nothing
    assert first[1]._conv_tap.input is None
