"""CBN over a channel concatenation (DenseNet's pre-activation norms): each slice produced by a
trainable conv is compensated with that conv, the others are used as recorded."""
import contextlib
import copy
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cbn_mmdet.models import BindStatus, CBNWarning, CrossIterationBatchNorm2d as CBN
from cbn_mmdet.models import iteration_clock
from cbn_mmdet.models.cbn import is_history_state_key

AS_RECORDED = r'input is a concatenation .*channels 0-2 as recorded \(ReluBackward0\)'


class Slices(nn.Module):
    """Four slices: relu(conv) (as recorded), a 3x3 conv with bias, an average pool of a 1x1 conv
    of a larger input (compensated through the pool) and a grouped conv, each 3, 4, 5, 4 channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 3, 3, padding=1)
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 5, 1)
        self.g = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)

    def pieces(self, x, big):
        return [torch.relu(self.stem(x)), self.a(x), F.avg_pool2d(self.b(big), 2),
                self.g(torch.cat([x, x[:, :1]], 1))]

    def forward(self, x, big):
        return torch.cat(self.pieces(x, big), 1)


WIDTHS = (3, 4, 5, 4)
C = sum(WIDTHS)


def _inputs(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 6, 5, dtype=torch.float64, generator=gen) + 0.3,
             torch.randn(2, 3, 12, 10, dtype=torch.float64, generator=gen) - 0.2) for _ in range(n)]


@contextlib.contextmanager
def _quiet():
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', CBNWarning)
        yield


# ---------------------------------------------------------------- against per-slice oracles
def _first_order(fn, old, now):
    """μ, ν of ``fn(θ)`` at θ_old and their first-order expansions to θ_now (Eqs. 7-8), with the
    exact recomputation at θ_now; ``old``/``now``: (weight, bias)."""
    w = old[0].clone().requires_grad_(True)
    b = None if old[1] is None else old[1].clone().requires_grad_(True)
    out = fn(w, b)
    mu, nu = out.mean((0, 2, 3)), out.square().mean((0, 2, 3))
    leaves = [w] if b is None else [w, b]
    rows_mu = [torch.autograd.grad(mu[j], leaves, retain_graph=True) for j in range(mu.numel())]
    rows_nu = [torch.autograd.grad(nu[j], leaves, retain_graph=True) for j in range(nu.numel())]
    deltas = [now[0] - old[0]] + ([] if b is None else [now[1] - old[1]])

    def step(rows):
        return torch.stack([sum((g * d).sum() for g, d in zip(row, deltas)) for row in rows])

    mu_t, nu_t = mu.detach() + step(rows_mu), nu.detach() + step(rows_nu)
    with torch.no_grad():
        exact = fn(*now)
    return (mu_t, torch.clamp_min(nu_t - mu_t.square(), 0.0),
            exact.mean((0, 2, 3)), exact.var((0, 2, 3), correction=0),
            mu.detach(), (nu - mu.square()).detach())


def _slice_functions(model, x, big):
    """Each compensated slice as a function of its conv's (weight, bias), and its conv."""
    x_g = torch.cat([x, x[:, :1]], 1)
    return [
        (model.a, lambda w, b: F.conv2d(x, w, b, padding=1)),
        (model.b, lambda w, b: F.avg_pool2d(F.conv2d(big, w, b), 2)),
        (model.g, lambda w, b: F.conv2d(x_g, w, b, padding=1, groups=2)),
    ]


def _params(conv):
    return (conv.weight.detach().clone(),
            None if conv.bias is None else conv.bias.detach().clone())


def _train(model, norm, batches, lr, record=None):
    opt = torch.optim.SGD(list(model.parameters()) + list(norm.parameters()), lr=lr)
    gen = torch.Generator().manual_seed(99)
    for x, big in batches:
        if record is not None:
            record.append({name: _params(m) for name, m in model.named_children()})
        y = norm(model(x, big))
        (y * torch.randn(y.shape, dtype=y.dtype, generator=gen)).sum().backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize('lr', [0.05, 0.01])
def test_window_statistics_equal_per_slice_oracles(lr):
    """Over several SGD steps, each past entry of each compensated slice equals the first-order
    expansion (Eqs. 7, 8, 10) of its conv around the weights it was recorded with, the mean also the
    exact recomputation with the current weights; the other channels are used as recorded."""
    torch.manual_seed(0)
    model = Slices().double()
    norm = CBN(C, concat='compensate', window=4).double()
    batches = _inputs(6, seed=1)
    weights = []
    with pytest.warns(CBNWarning, match=AS_RECORDED):
        _train(model, norm, batches, lr, weights)
    assert norm.last_bind_status == BindStatus.CONCAT
    past = norm.past_window()
    slots = norm.history.slots_newest_first()
    now = weights[-1]   # the last forward ran with these weights
    naive_error = compensated_error = 0.0
    for age in (1, 2, 3):
        # (the past window was computed before the current entry took the oldest one's slot)
        slot, (x, big) = slots[age % len(slots)], batches[-1 - age]
        then = weights[-1 - age]
        assert past['valid'][slot] == 1
        start = WIDTHS[0]
        for (conv, fn), width in zip(_slice_functions(model, x, big), WIDTHS[1:]):
            name = [n for n, m in model.named_children() if m is conv][0]
            mu_t, var_t, mu_exact, var_exact, mu, var = _first_order(fn, then[name], now[name])
            rows = slice(start, start + width)
            # as recorded, then moved: mean exact (linear in θ), variance the first-order step
            torch.testing.assert_close(past['mean'][slot, rows], mu, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(past['var'][slot, rows], var, rtol=1e-10, atol=1e-12)
            torch.testing.assert_close(past['mean_compensated'][slot, rows], mu_t, rtol=1e-9,
                                       atol=1e-11)
            torch.testing.assert_close(past['mean_compensated'][slot, rows], mu_exact, rtol=1e-9,
                                       atol=1e-11)
            torch.testing.assert_close(past['var_compensated'][slot, rows], var_t, rtol=1e-9,
                                       atol=1e-11)
            naive_error = max(naive_error, float((mu - mu_exact).abs().max()))
            compensated_error = max(compensated_error, float(
                (past['mean_compensated'][slot, rows] - mu_exact).abs().max()))
            start += width
        # the relu slice: as recorded
        with torch.no_grad():
            relu = torch.relu(F.conv2d(x, *then['stem'], padding=1))
        torch.testing.assert_close(past['mean_compensated'][slot, :3], relu.mean((0, 2, 3)))
        torch.testing.assert_close(past['var_compensated'][slot, :3],
                                   relu.var((0, 2, 3), correction=0))
    assert naive_error > 1e4 * max(compensated_error, 1e-16)


def _variance_error(lr):
    torch.manual_seed(0)
    model = Slices().double()
    norm = CBN(C, concat='compensate', window=4).double()
    batches = _inputs(6, seed=1)
    weights = []
    with _quiet():
        _train(model, norm, batches, lr, weights)
    past, slots = norm.past_window(), norm.history.slots_newest_first()
    worst = naive = 0.0
    for age in (1, 2, 3):
        x, big = batches[-1 - age]
        start = WIDTHS[0]
        for (conv, fn), width in zip(_slice_functions(model, x, big), WIDTHS[1:]):
            name = [n for n, m in model.named_children() if m is conv][0]
            with torch.no_grad():
                exact = fn(*weights[-1][name]).var((0, 2, 3), correction=0)
            rows, slot = slice(start, start + width), slots[age % len(slots)]
            worst = max(worst, float((past['var_compensated'][slot, rows] - exact).abs().max()))
            naive = max(naive, float((past['var'][slot, rows] - exact).abs().max()))
            start += width
    return worst, naive


def test_variance_error_against_recomputation_is_second_order():
    """Against the past batches recomputed with the current weights, the variance's error is
    O(Δθ²) (halving the steps quarters it) and far below the uncompensated one."""
    big, _ = _variance_error(2e-4)
    small, small_naive = _variance_error(1e-4)
    assert small < 0.1 * small_naive
    assert 3.5 < big / small < 4.5


# ---------------------------------------------------------------- against separate layers
class SeparateNorms(nn.Module):
    """The same statistics per channel by construction: one CBN per slice (the single-conv path,
    the relu slice with the naive fallback), the pooled 1x1 conv as the conv of the pooled input."""

    def __init__(self, model: Slices, norm: CBN):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.norms = nn.ModuleList([CBN(w, window=norm.window, fallback='naive').double()
                                    for w in WIDTHS])

    def forward(self, x, big):
        m = self.model
        pieces = [torch.relu(m.stem(x)), m.a(x), m.b(F.avg_pool2d(big, 2)),
                  m.g(torch.cat([x, x[:, :1]], 1))]
        return torch.cat([norm(p) for norm, p in zip(self.norms, pieces)], 1)


@pytest.mark.parametrize('window,calls', [(2, 1), (4, 1), (3, 2)])
def test_outputs_gradients_and_running_stats_equal_one_cbn_per_slice(window, calls):
    """``calls=2``: two forwards per iteration (gradient accumulation), pooled into one entry."""
    torch.manual_seed(0)
    model = Slices().double()
    norm = CBN(C, concat='compensate', window=window).double()
    separate = SeparateNorms(model, norm)
    opt = torch.optim.SGD(list(model.parameters()) + list(norm.parameters()), lr=0.05)
    opt_ref = torch.optim.SGD(separate.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    with _quiet():
        for i, (x, big) in enumerate(_inputs(6 * calls, seed=2)):
            x_ref, big_ref = x.clone().requires_grad_(), big.clone().requires_grad_()
            x, big = x.requires_grad_(), big.requires_grad_()
            y, y_ref = norm(model(x, big)), separate(x_ref, big_ref)
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
            g = torch.randn(y.shape, dtype=y.dtype, generator=gen)
            (y * g).sum().backward()
            (y_ref * g).sum().backward()
            torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(big.grad, big_ref.grad, rtol=1e-9, atol=1e-10)
            for p, p_ref in zip(model.parameters(), separate.model.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(norm.weight.grad,
                                       torch.cat([n.weight.grad for n in separate.norms]))
            torch.testing.assert_close(norm.bias.grad, torch.cat([n.bias.grad for n in separate.norms]))
            torch.testing.assert_close(norm.running_mean,
                                       torch.cat([n.running_mean for n in separate.norms]))
            torch.testing.assert_close(norm.running_var,
                                       torch.cat([n.running_var for n in separate.norms]))
            if (i + 1) % calls:
                continue
            for o in (opt, opt_ref):
                o.step()
                o.zero_grad()
    assert norm.last_bind_status == BindStatus.CONCAT
    assert [n.last_bind_status for n in separate.norms] == [BindStatus.NOT_CONV] + [
        BindStatus.CONV] * 3


def test_equals_one_conv_split_in_two():
    """A conv split into two convs whose outputs are concatenated is the same layer: CBN over the
    concatenation equals CBN over the whole conv, step after step."""
    torch.manual_seed(3)
    whole = nn.Conv2d(3, 6, 3, padding=1).double()
    top, bottom = nn.Conv2d(3, 2, 3, padding=1).double(), nn.Conv2d(3, 4, 3, padding=1).double()
    with torch.no_grad():
        for part, rows in ((top, slice(0, 2)), (bottom, slice(2, 6))):
            part.weight.copy_(whole.weight[rows])
            part.bias.copy_(whole.bias[rows])
    norm, norm_ref = CBN(6, window=3, concat='compensate').double(), CBN(6, window=3).double()
    opt = torch.optim.SGD([*top.parameters(), *bottom.parameters(), *norm.parameters()], lr=0.1)
    opt_ref = torch.optim.SGD([*whole.parameters(), *norm_ref.parameters()], lr=0.1)
    for x, _ in _inputs(5, seed=4):
        y = norm(torch.cat([top(x), bottom(x)], 1))
        y_ref = norm_ref(whole(x))
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        (y.square() * torch.arange(6.0, dtype=y.dtype).view(1, -1, 1, 1)).sum().backward()
        (y_ref.square() * torch.arange(6.0, dtype=y.dtype).view(1, -1, 1, 1)).sum().backward()
        torch.testing.assert_close(torch.cat([top.weight.grad, bottom.weight.grad]),
                                   whole.weight.grad, rtol=1e-9, atol=1e-10)
        opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    assert norm.last_bind_status == BindStatus.CONCAT
    assert norm.past_window()['valid'].sum() == 2
    torch.testing.assert_close(norm.past_window()['var_compensated'],
                               norm_ref.past_window()['var_compensated'], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- a DenseNet-like block trains
class DenseBlock(nn.Module):
    """Two pre-activation dense layers after a stem (norm1 over the concatenation, conv1 1x1,
    norm2, conv2 3x3), the block's concatenation normalised at the end (a transition's norm)."""

    def __init__(self, growth=4, **cbn):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), CBN(6, **cbn),
                                  nn.ReLU(), nn.MaxPool2d(3, 1, 1))
        self.layers = nn.ModuleList()
        channels = 6
        for _ in range(2):
            self.layers.append(nn.ModuleDict(dict(
                norm1=CBN(channels, **cbn), conv1=nn.Conv2d(channels, 8, 1, bias=False),
                norm2=CBN(8, **cbn), conv2=nn.Conv2d(8, growth, 3, padding=1, bias=False))))
            channels += growth
        self.norm = CBN(channels, **cbn)
        self.head = nn.Linear(channels, 3)

    def forward(self, x):
        features = [self.stem(x)]
        for layer in self.layers:
            h = layer['conv1'](torch.relu(layer['norm1'](torch.cat(features, 1))))
            features.append(layer['conv2'](torch.relu(layer['norm2'](h))))
        out = torch.relu(self.norm(torch.cat(features, 1)))
        return self.head(out.mean((2, 3)))


def test_dense_block_trains_with_compensated_slices():
    torch.manual_seed(0)
    net = DenseBlock(window=3, concat='compensate')
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=gen)
    target = torch.randint(3, (4, ), generator=gen)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always', CBNWarning)
        for _ in range(25):
            loss = F.cross_entropy(net(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss))
    said = sorted(str(w.message) for w in caught if issubclass(w.category, CBNWarning))
    # once per layer: the first norm1's fallback, the channels as recorded in the other two
    fallback = [w for w in said if 'normalising with the current batch' in w]
    assert len(said) == 3 and len(fallback) == 1
    assert fallback[0].startswith('CBN(6): input is not the output of a trainable conv (CatBackward0 '
                                  'of MaxPool2DWithIndicesBackward0)')
    assert all('channels 0-5 as recorded (MaxPool2DWithIndicesBackward0)' in w
               for w in said if w not in fallback)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < 0.5 * losses[0]
    first, second = net.layers
    # the first norm1 sees only the max-pooled stem: the fallback; the others a compensated slice
    assert first['norm1'].last_bind_status == BindStatus.NOT_CONV
    assert second['norm1'].last_bind_status == BindStatus.CONCAT
    assert net.norm.last_bind_status == BindStatus.CONCAT
    assert first['norm2'].last_bind_status == BindStatus.CONV
    # the final norm: two compensated slices of 4 channels after the stem's 6
    assert net.norm.slice_histories[0].layout[0][:2] == (6, 4)
    assert [key[:2] for key in net.norm.slice_histories[0].layout] == [(6, 4), (10, 4)]
    assert net.norm.past_window()['valid'].sum() == 2


def test_concat_fallback_option_and_validation():
    with pytest.raises(ValueError, match=r"concat must be one of \('compensate', 'fallback'\)"):
        CBN(4, concat='slices')
    assert "concat='compensate'" in repr(CBN(4, concat='compensate'))
    assert 'concat' not in repr(CBN(4))   # the default, 'fallback'
    conv = nn.Conv2d(3, 4, 3, padding=1)
    norm = CBN(7)
    with pytest.warns(CBNWarning, match=r"\(CatBackward0\); normalising with the current batch"):
        norm(torch.cat([conv(torch.randn(2, 3, 5, 5)), torch.randn(2, 3, 5, 5)], 1))
    assert norm.last_bind_status == BindStatus.NOT_CONV
    # compensate: the constant slice is exact as recorded, no warning
    norm = CBN(7, concat='compensate')
    norm(torch.cat([conv(torch.randn(2, 3, 5, 5)), torch.randn(2, 3, 5, 5)], 1))
    assert norm.last_bind_status == BindStatus.CONCAT
    assert [s.kind for s in norm._concat_producer.last.slices] == ['conv', 'fixed']


# ---------------------------------------------------------------- state, layout changes
def _run(model, norm, batches, lr=0.05):
    with _quiet():
        _train(model, norm, batches, lr)


def test_state_dict_round_trip_continues_exactly():
    torch.manual_seed(0)
    model, norm = Slices().double(), CBN(C, concat='compensate', window=4).double()
    batches = _inputs(6, seed=7)
    _run(model, norm, batches[:4])
    state = norm.state_dict()
    assert {'slice0_history_var_grad', 'slice2_history_patch_mean', 'history_slices'} <= set(state)
    assert state['history_slices'].tolist() == [[3, 4], [7, 5], [12, 4]]
    assert all(is_history_state_key('backbone.norm.' + k) for k in state if 'slice' in k)
    assert is_history_state_key('n.call1_slice0_history_var_grad')
    buffer = io.BytesIO()
    torch.save({'model': model.state_dict(), 'norm': state}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model2, norm2 = Slices().double(), CBN(C, concat='compensate', window=4).double()
    model2.load_state_dict(saved['model'])
    assert not norm2.load_state_dict(saved['norm'], strict=True).unexpected_keys
    _run(model, norm, batches[4:])
    _run(model2, norm2, batches[4:])
    for key, value in norm.state_dict().items():
        torch.testing.assert_close(norm2.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert norm2.slice_histories[0].layout[0][3] is not None  # the loaded layout adopted its convs


def test_checkpoint_without_slice_histories():
    """A BN checkpoint loads strictly with an empty window; one with the ring but without the
    per-slice histories (e.g. saved with fallback='naive' before they existed) uses the ring's entries
    as recorded for one window, then compensates again."""
    torch.manual_seed(0)
    model, norm = Slices().double(), CBN(C, concat='compensate', window=3).double()
    bn = nn.BatchNorm2d(C).double()
    assert not norm.load_state_dict(bn.state_dict(), strict=True).missing_keys
    batches = _inputs(6, seed=8)
    _run(model, norm, batches[:3])
    ring_only = {k: v for k, v in norm.state_dict().items() if 'slice' not in k}
    fresh = CBN(C, concat='compensate', window=3).double()
    fresh.load_state_dict(ring_only, strict=True)
    assert fresh.slice_histories[0].layout is None and fresh.history_length == 2
    _run(model, fresh, batches[3:4])
    past = fresh.past_window()
    torch.testing.assert_close(past['mean_compensated'], past['mean'])  # no gradients yet
    _run(model, fresh, batches[4:6])
    past = fresh.past_window()
    assert not torch.allclose(past['mean_compensated'][:, 3:], past['mean'][:, 3:])


def test_changed_slices_warn_once_and_discard_past_gradients():
    torch.manual_seed(0)
    conv_a, conv_b, conv_c = (nn.Conv2d(3, 4, 3, padding=1).double() for _ in range(3))
    norm = CBN(8, window=3, concat='compensate').double()
    opt = torch.optim.SGD([*conv_a.parameters(), *conv_b.parameters(), *conv_c.parameters()],
                          lr=0.1)

    def step(first, x):
        y = norm(torch.cat([first(x), conv_b(x)], 1))
        y.square().mul(torch.arange(8.0, dtype=y.dtype).view(1, -1, 1, 1)).sum().backward()
        opt.step()
        opt.zero_grad()

    batches = _inputs(6, seed=9)
    for x, _ in batches[:3]:
        step(conv_a, x)
    # the same shapes from another conv: its gradients would compensate with the wrong weights
    with pytest.warns(CBNWarning, match='slices of its concatenated input changed'):
        step(conv_c, batches[3][0])
    past = norm.past_window()
    torch.testing.assert_close(past['mean_compensated'], past['mean'])
    with warnings.catch_warnings():
        warnings.simplefilter('error')   # once
        for x, _ in batches[4:]:
            step(conv_c, x)
    past = norm.past_window()
    assert not torch.allclose(past['mean_compensated'], past['mean'])


def test_other_binding_in_between_rebuilds_the_slices_from_the_ring():
    """Iterations recorded through another path (here a single conv) are not in the sub-histories:
    they are rebuilt from the ring (those entries as recorded), never misaligned."""
    torch.manual_seed(0)
    top, bottom = nn.Conv2d(3, 2, 3, padding=1).double(), nn.Conv2d(3, 4, 3, padding=1).double()
    whole = nn.Conv2d(3, 6, 3, padding=1).double()
    norm = CBN(6, window=3, concat='compensate').double()
    opt = torch.optim.SGD([*top.parameters(), *bottom.parameters(), *whole.parameters()], lr=0.1)
    with _quiet():
        for i, (x, _) in enumerate(_inputs(6, seed=10)):
            y = norm(whole(x) if i in (2, 3) else torch.cat([top(x) * 1.0, bottom(x)], 1))
            y.square().mul(torch.arange(6.0, dtype=y.dtype).view(1, -1, 1, 1)).sum().backward()
            opt.step()
            opt.zero_grad()
            if i == 4:  # the first concatenation after the conv path: the ring as recorded
                past = norm.past_window()
                assert past['valid'].sum() == 2
                torch.testing.assert_close(past['mean_compensated'], past['mean'])
    assert norm.last_bind_status == BindStatus.CONCAT
    past = norm.past_window()
    slots = norm.history.slots_newest_first()
    newest, older = slots[1], slots[0]   # iteration 4 (concatenation), iteration 3 (conv path)
    assert not torch.allclose(past['mean_compensated'][newest, 2:], past['mean'][newest, 2:])
    torch.testing.assert_close(past['mean_compensated'][older], past['mean'][older])
    torch.testing.assert_close(past['mean_compensated'][:, :2], past['mean'][:, :2])


def test_to_moves_the_slice_histories():
    torch.manual_seed(0)
    model, norm = Slices().double(), CBN(C, concat='compensate', window=3).double()
    _run(model, norm, _inputs(3, seed=11))
    norm.float()
    sub = norm.slice_histories[0].subs[(3, 4)]
    assert sub._stats.dtype == torch.float32 and sub._grads.dtype == torch.float32
    model.float()
    with _quiet():
        x, big = _inputs(1, seed=12)[0]
        norm(model(x.float(), big.float()))
    assert norm.last_bind_status == BindStatus.CONCAT


def test_non_reentrant_checkpoint_normalises_like_the_plain_forward():
    torch.manual_seed(0)
    model = Slices().double()
    norm = CBN(C, concat='compensate', window=3).double()
    model_ref, norm_ref = copy.deepcopy(model), copy.deepcopy(norm)
    opt = torch.optim.SGD([*model.parameters(), *norm.parameters()], lr=0.05)
    opt_ref = torch.optim.SGD([*model_ref.parameters(), *norm_ref.parameters()], lr=0.05)
    with _quiet():
        for x, big in _inputs(4, seed=13):
            y = torch.utils.checkpoint.checkpoint(lambda a, b: norm(model(a, b)), x, big,
                                                  use_reentrant=False)
            y_ref = norm_ref(model_ref(x, big))
            torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
            y.square().sum().backward()
            y_ref.square().sum().backward()
            for p, p_ref in zip(model.parameters(), model_ref.parameters()):
                torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-10)
            opt.step(), opt_ref.step(), opt.zero_grad(), opt_ref.zero_grad()
    assert norm.last_bind_status == BindStatus.CONCAT
    for key, value in norm_ref.state_dict().items():
        torch.testing.assert_close(norm.state_dict()[key], value, rtol=1e-9, atol=1e-10, msg=key)


def test_float32_equals_one_cbn_per_slice():
    """The float32 path (the fused CPU ops where they are built) per slice, as the single conv's."""
    torch.manual_seed(0)
    model = Slices().float()
    norm = CBN(C, concat='compensate', window=4)
    separate = SeparateNorms(model, norm).float()
    opt = torch.optim.SGD(list(model.parameters()) + list(norm.parameters()), lr=0.05)
    opt_ref = torch.optim.SGD(separate.parameters(), lr=0.05)
    gen = torch.Generator().manual_seed(5)
    with _quiet():
        for x, big in _inputs(6, seed=2):
            x, big = x.float(), big.float()
            y, y_ref = norm(model(x, big)), separate(x, big)
            torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(norm.running_var,
                                       torch.cat([n.running_var for n in separate.norms]))
            g = torch.randn(y.shape, generator=gen)
            (y * g).sum().backward()
            (y_ref * g).sum().backward()
            for o in (opt, opt_ref):
                o.step()
                o.zero_grad()
    assert norm.last_bind_status == BindStatus.CONCAT
