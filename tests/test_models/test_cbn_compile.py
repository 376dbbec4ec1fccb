"""torch.compile: CBN layers run eagerly (a graph break each, no recompilation); a conv feeding CBN
must stay eager too, and a compiled one is refused loudly instead of silently losing compensation."""

import pytest
import torch
import torch.nn as nn

from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN

pytest.importorskip('torch._dynamo')


class ConvNorm(nn.Module):
    """conv + CBN + ReLU, like mmcv's ConvModule."""

    def __init__(self, cin, cout):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(cin, cout, 3, padding=1), CBN(cout, window=3)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def _model():
    torch.manual_seed(0)
    return nn.Sequential(ConvNorm(3, 4), nn.Conv2d(4, 4, 1), nn.GELU(), ConvNorm(4, 4),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def _train(model, forward, steps=6):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    outs = []
    for _ in range(steps):
        x = torch.randn(2, 3, 8, 8, generator=gen)
        out = forward(x)
        out.square().sum().backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return outs


@pytest.mark.skipif(tuple(int(v) for v in torch.__version__.split('.')[:2]) < (2, 4),
                    reason='torch 2.1 under torch.compile skips the global optimizer step hooks '
                           "that advance CBN's iteration clock (README: modes)")
def test_compiled_model_with_eager_producer_convs_equals_eager():
    """Everything compiled but the convs that feed CBN: same outputs and state as eager."""
    torch._dynamo.reset()
    eager, compiled = _model(), _model()
    for block in (compiled[0], compiled[3]):
        block.conv.forward = torch.compiler.disable(block.conv.forward)
    frames = torch._dynamo.utils.counters['stats']['unique_graphs']
    ref = _train(eager, eager)
    got = _train(compiled, torch.compile(compiled, backend='aot_eager'))
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-6, atol=1e-6, msg=key)
    norms = [m for m in compiled.modules() if isinstance(m, CBN)]
    assert [m.last_bind_status for m in norms] == ['conv', 'conv']
    assert all(m.history_length == 2 for m in norms)
    # the graphs between the eager parts are compiled once, not once per step
    graphs = torch._dynamo.utils.counters['stats']['unique_graphs'] - frames
    assert graphs <= 4  # 1 on torch 2.13; 12 and growing when dynamo traced into CBN


def test_conv_compiled_into_a_graph_is_refused():
    torch._dynamo.reset()

    class Stem(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.norm = nn.Conv2d(3, 4, 3, padding=1), CBN(4, window=3)

        def forward(self, x):
            return self.norm(self.conv(torch.relu(2 * x + 1)))

    model = Stem()
    with pytest.raises(RuntimeError, match='torch.compile graph'):
        torch.compile(model, backend='aot_eager')(torch.randn(2, 3, 8, 8))
