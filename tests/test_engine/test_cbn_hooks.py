"""CBN hooks and runner guards, through a real mmengine Runner on a toy model."""
import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine.hooks import CBNBurnInHook, auto_window
from cbn_mmdet.engine.sync_bn_guard import SyncBNWithCBNError
from cbn_mmdet.models import BatchRenorm2d as BRN
from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN


class ToyData(Dataset):
    def __init__(self, n=8):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=gen)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i])


class ToyModel(BaseModel):
    def __init__(self, window=4):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = CBN(4, window=window)
        self.head = nn.Linear(4, 1)

    def forward(self, inputs, data_samples=None, mode='loss'):
        feat = torch.relu(self.norm(self.conv(inputs))).mean((2, 3))
        out = self.head(feat)
        return dict(loss=out.square().mean()) if mode == 'loss' else out


class Recorder(Hook):
    priority = 'LOW'  # after the burn-in hook

    def __init__(self):
        self.windows, self.lengths = [], []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.windows.append(runner.model.norm.active_window)

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.lengths.append(runner.model.norm.history_length)


def _experiment_name() -> str:
    """A name of its own for each runner: mmengine names them by the second they start, and a
    second runner of the same second would reuse (and warn about) the first one's logger,
    visualizer and scope instances."""
    return f'toy_{next(_RUNNERS)}'


_RUNNERS = itertools.count()


def _toy_runner(work_dir, model, hooks, max_epochs=2, checkpoint=None, optimizer=None, **kw):
    """A Runner over ToyData (8 images, batch 2: 4 iterations per epoch), no logger."""
    kw.setdefault('experiment_name', _experiment_name())
    return Runner(
        model=model, work_dir=str(work_dir),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=optimizer or dict(type='SGD', lr=0.01)),
        custom_hooks=list(hooks), default_hooks=dict(logger=None, checkpoint=checkpoint),
        default_scope='mmdet', **kw)


def _runner(tmp_path, hook_cfg, max_epochs=3, window=4, **kw):
    recorder = Recorder()
    return _toy_runner(tmp_path, ToyModel(window), [hook_cfg, recorder], max_epochs, **kw), recorder


def test_burn_in_by_epoch_switches_after_burn_in(tmp_path):
    runner, rec = _runner(tmp_path, dict(type='CBNBurnInHook', burn_in=1, window=3))
    runner.train()
    # 4 iterations per epoch: epoch 0 is BN, then window 3
    assert rec.windows == [1] * 4 + [3] * 8
    assert runner.model.norm.window == 3
    # no history while BN; then it fills to window - 1 = 2 (the iteration just run included)
    assert rec.lengths[:4] == [0] * 4 and rec.lengths[4:8] == [1, 2, 2, 2]


def test_burn_in_by_iteration_with_ramp(tmp_path):
    runner, rec = _runner(tmp_path, dict(type='CBNBurnInHook', burn_in=2, by_epoch=False, ramp=4,
                                         window=6))
    runner.train()
    assert rec.windows == [1, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6]


def test_window_auto_uses_images_per_gpu(tmp_path):
    runner, rec = _runner(tmp_path, dict(type='CBNBurnInHook', burn_in=0, window='auto'),
                          max_epochs=1)
    runner.train()
    assert runner.model.norm.window == auto_window(2) == 8
    assert auto_window(1) == 8 and auto_window(4) == 4 and auto_window(16) == 1


@pytest.mark.parametrize('kwargs,match', [
    (dict(burn_in=-1), 'burn_in'), (dict(burn_in='3'), 'burn_in'), (dict(ramp=-2), 'ramp'),
    (dict(window=0), 'window'), (dict(window='max'), 'window'), (dict(by_epoch='yes'), 'by_epoch'),
    (dict(burn_in=1.5, by_epoch=False), 'whole numbers'),
])
def test_burn_in_hook_rejects_bad_settings(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        CBNBurnInHook(**kwargs)


def test_burn_in_hook_rejects_unknown_key(tmp_path):
    with pytest.raises(TypeError, match='burnin'):
        _runner(tmp_path, dict(type='CBNBurnInHook', burnin=3))[0].train()


def test_set_window_keeps_newest_history():
    conv, norm = nn.Conv2d(3, 4, 3), CBN(4, window=4)
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.1)
    for _ in range(5):
        norm(conv(torch.randn(2, 3, 6, 6))).square().mean().backward()
        opt.step()
    assert norm.history_length == 3
    newest = norm.history.entries()[0].mean.clone()
    norm.set_window(2)
    assert norm.window == 2 and norm.active_window == 2 and norm.history_length == 1
    torch.testing.assert_close(norm.history.entries()[0].mean, newest)
    norm.set_window(6)
    assert norm.history_length == 1 and norm.history.slots == 5
    assert norm.history.get('history_mean').shape[0] == 5  # the ring itself was re-allocated


def test_sync_bn_conversion_refuses_cbn():
    import mmengine.runner.runner as runner_module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4), nn.BatchNorm2d(4))
    with pytest.raises(SyncBNWithCBNError, match='CBN layers'):
        runner_module.convert_sync_batchnorm(model, 'torch')
    plain = runner_module.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 'torch')
    assert isinstance(plain[0], nn.SyncBatchNorm)


def test_sync_bn_sync_cbn_converts_cbn_with_its_options_tensors_and_history():
    import mmengine.runner.runner as runner_module

    from cbn_mmdet.models import SyncCrossIterationBatchNorm2d
    cbn = CBN(4, window=3, momentum=0.2, per_call=2, var_grad_dtype='bfloat16')
    conv = nn.Conv2d(3, 4, 3)
    with pytest.warns(UserWarning):  # nothing trainable upstream: uncompensated
        cbn(conv(torch.randn(2, 3, 6, 6)).detach())
    model = nn.Sequential(conv, cbn, nn.BatchNorm2d(4))
    runner_module.convert_sync_batchnorm(model, 'SyncCBN')
    sync = model[1]
    assert type(sync) is SyncCrossIterationBatchNorm2d and isinstance(model[2], nn.SyncBatchNorm)
    assert (sync.window, sync.momentum, sync.per_call, sync.var_grad_dtype) == (3, 0.2, 2,
                                                                              'bfloat16')
    assert sync.weight is cbn.weight and sync.running_mean is cbn.running_mean
    assert sync.history is cbn.history and sync.history.filled == 1
    with pytest.raises(SyncBNWithCBNError, match='BatchRenorm2d'):
        runner_module.convert_sync_batchnorm(nn.Sequential(CBN(4), BRN(4)), 'SyncCBN')
    with pytest.raises(SyncBNWithCBNError, match="sync_bn='SyncCBN'"):
        runner_module.convert_sync_batchnorm(nn.Sequential(SyncCrossIterationBatchNorm2d(4)),
                                             'torch')


class BNToyModel(ToyModel):
    def __init__(self):
        super().__init__()
        self.norm = nn.BatchNorm2d(4)


def test_norm_switch_hook_bn_to_cbn_hands_over_parameters(tmp_path):
    """BN → CBN at epoch 1: same parameter objects, optimizer state kept, CBN then trains."""
    seen = {}

    class Watch(Hook):
        priority = 'LOW'

        def before_train_epoch(self, runner):
            seen[runner.epoch] = (type(runner.model.norm), runner.model.norm.weight,
                                  runner.model.norm.running_mean)

    runner = _toy_runner(
        tmp_path, BNToyModel(),
        [dict(type='NormSwitchHook', switch_epoch=1, to=dict(type='CBN', window=2)), Watch()],
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9))
    runner.train()
    assert seen[0][0] is nn.BatchNorm2d and seen[1][0] is CBN
    assert seen[1][1] is seen[0][1] and seen[1][2] is seen[0][2]  # the same tensors
    opt = runner.optim_wrapper.optimizer
    assert any(p is runner.model.norm.weight for g in opt.param_groups for p in g['params'])
    assert 'momentum_buffer' in opt.state[runner.model.norm.weight]
    assert runner.model.norm.history_length == 1
    assert runner.model.norm.last_bind_status == 'conv'


def test_norm_switch_hook_to_syncbn_refuses_single_process(tmp_path):
    runner = _toy_runner(tmp_path, BNToyModel(), [dict(type='NormSwitchHook', switch_epoch=0)],
                         max_epochs=1)
    with pytest.raises(RuntimeError, match='distributed'):
        runner.train()


@pytest.mark.parametrize('kwargs,match', [
    (dict(), 'exactly one'), (dict(switch_epoch=1, switch_iter=3), 'exactly one'),
    (dict(switch_epoch=-1), 'switch_epoch'), (dict(switch_epoch=1, to='GN'), 'to='),
    (dict(switch_epoch=1, from_types=('Nope', )), 'from_types'),
])
def test_norm_switch_hook_rejects_bad_settings(kwargs, match):
    from cbn_mmdet.engine.hooks import NormSwitchHook
    with pytest.raises(ValueError, match=match):
        NormSwitchHook(**kwargs)


def _taylor_correction(seen, past, current, bias=None, eps=1e-5):
    """What CBNMonitorHook reports, from scratch in float64: each past iteration's μ and ν = E[x²]
    moved to the current weights by autograd's first-order step (Eqs. 7-8), var = max(ν̃ − μ̃², 0)
    (Eq. 10); returns (mean_τ,c |Δμ|/σ, mean_τ,c |Δvar|/var) with σ, var as recorded."""
    w_now = seen[current][1]
    b_now = None if bias is None else bias[current]
    rel_mean, rel_var = [], []
    for i in past:
        x, w = seen[i]
        w = w.clone().requires_grad_(True)
        b = None if bias is None else bias[i].clone().requires_grad_(True)
        out = F.conv2d(x, w, b, 1, 1)
        mu, nu = out.mean((0, 2, 3)), (out * out).mean((0, 2, 3))
        params = (w, ) if b is None else (w, b)
        d_mu = torch.autograd.grad(mu.sum(), params, retain_graph=True)  # row j: dμ_j/dθ_j
        d_nu = torch.autograd.grad(nu.sum(), params)
        steps = [(w_now - w).detach()] + ([] if b is None else [(b_now - b).detach()])
        mu_t = mu.detach() + sum((g * d).flatten(1).sum(1) if g.dim() > 1 else g * d
                                 for g, d in zip(d_mu, steps))
        nu_t = nu.detach() + sum((g * d).flatten(1).sum(1) if g.dim() > 1 else g * d
                                 for g, d in zip(d_nu, steps))
        var = (nu - mu * mu).detach()
        var_t = (nu_t - mu_t * mu_t).clamp_min(0.0)
        rel_mean.append((mu_t - mu.detach()).abs() / (var + eps).sqrt())
        rel_var.append((var_t - var).abs() / (var + eps))
    return torch.cat(rel_mean).mean(), torch.cat(rel_var).mean()


class WatchedModel(ToyModel):
    """Keeps each iteration's input and conv weight (float64 copies) for an independent check."""

    def __init__(self):
        super().__init__(window=3)
        self.seen = []

    def forward(self, inputs, data_samples=None, mode='loss'):
        self.seen.append((inputs.detach().double(), self.conv.weight.detach().double().clone()))
        return super().forward(inputs, data_samples, mode)


def test_monitor_hook_logs_the_correction_of_a_known_weight_change(tmp_path):
    """The logged |Δμ|/σ and |Δvar|/var of the last iteration equal a from-scratch Taylor step."""
    torch.manual_seed(0)
    model = WatchedModel()
    runner = _toy_runner(tmp_path, model, [dict(type='CBNMonitorHook', interval=1)], max_epochs=1,
                         optimizer=dict(type='SGD', lr=2.0))
    runner.train()
    assert model.norm.monitor is True and len(model.seen) == 4
    mean, var = _taylor_correction(model.seen, past=(1, 2), current=3)
    assert var > 1e-3  # the weights moved enough for a clear correction
    hub = runner.message_hub
    for key, value in (('mean', mean), ('var', var)):
        for stat in ('avg', 'max'):  # one layer: average and worst are the same
            logged = hub.get_scalar(f'train/cbn/correction_{key}_{stat}').current()
            assert logged == pytest.approx(float(value), rel=1e-3), (key, stat)


def test_monitor_matches_an_independent_taylor_step():
    """last_correction (float64 layer, conv with bias) equals the from-scratch Taylor step."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = CBN(4, window=3, monitor=True).double()
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.5)
    seen, biases = [], []
    for _ in range(4):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        seen.append((x, conv.weight.detach().clone()))
        biases.append(conv.bias.detach().clone())
        norm(conv(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    mean, var = _taylor_correction(seen, past=(1, 2), current=3, bias=biases)
    assert mean > 1e-3 and var > 1e-3
    torch.testing.assert_close(norm.last_correction['mean'], mean, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(norm.last_correction['var'], var, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize('hook,allowed', [
    ('CBNBurnInHook', 'burn_in, window, by_epoch, ramp'), ('CBNMonitorHook', 'interval'),
    ('NormSwitchHook', 'switch_epoch'), ('RNGStateHook', 'none'),
])
def test_hooks_name_unknown_keys_and_list_allowed_ones(hook, allowed):
    from mmdet.registry import HOOKS
    with pytest.raises(TypeError, match=f"unknown option.*'typo'.*allowed:.*{allowed}"):
        HOOKS.build(dict(type=hook, typo=1))


def _switch_runner(tmp_path, max_epochs, resume=False, hooks=()):
    torch.manual_seed(0)  # the same initial weights in every run
    return _toy_runner(
        tmp_path, BNToyModel(),
        [dict(type='NormSwitchHook', switch_epoch=1, to=dict(type='CBN', window=3)), *hooks],
        max_epochs, checkpoint=dict(type='CheckpointHook', interval=1),
        optimizer=dict(type='SGD', lr=0.01, momentum=0.9), resume=resume, randomness=dict(seed=0))


def test_norm_switch_then_resume_restores_the_cbn_history(tmp_path):
    """A run switched BN → CBN, resumed from a checkpoint after the switch, continues with the
    checkpoint's CBN history (not an empty window) and equals the uninterrupted run."""
    states = {}

    class Snapshot(Hook):
        priority = 'VERY_LOW'

        def before_train_epoch(self, runner):
            norm = runner.model.norm
            states.setdefault(runner.epoch, (type(norm), getattr(norm, 'history_length', None)))

    full = _switch_runner(tmp_path / 'full', 3)
    full.train()
    first = _switch_runner(tmp_path / 'part', 2)
    first.train()
    saved = torch.load(tmp_path / 'part' / 'epoch_2.pth', map_location='cpu')
    assert saved['state_dict']['norm.history_index'][1] == 2
    resumed = _switch_runner(tmp_path / 'part', 3, resume=True, hooks=[Snapshot()])
    resumed.train()
    assert states[2] == (CBN, 2)  # the history of epoch 1, restored before epoch 2 starts
    for key, value in full.model.state_dict().items():
        torch.testing.assert_close(resumed.model.state_dict()[key], value, msg=key)


# ---------------------------------------------------------------- resumed runs
class _StartAt(Hook):
    """Puts the loop's counters where mmengine's resume puts them (Runner.resume sets
    ``train_loop._epoch``/``_iter`` from the checkpoint), before any other hook runs."""
    priority = 'HIGHEST'

    def __init__(self, epoch, iteration):
        self.epoch, self.iteration = epoch, iteration

    def before_train(self, runner):
        runner.train_loop._epoch, runner.train_loop._iter = self.epoch, self.iteration


def test_burn_in_of_a_resumed_run_continues_from_the_checkpoint(tmp_path):
    """The window comes from runner.iter: a run resumed from the epoch-1 checkpoint of an
    iteration-based ramp uses, from its first iteration on, the windows of the uninterrupted run."""
    hook = dict(type='CBNBurnInHook', burn_in=2, by_epoch=False, ramp=4, window=6)
    torch.manual_seed(0)
    full = Recorder()
    runner = _toy_runner(tmp_path, ToyModel(), [hook, full], max_epochs=3,
                         checkpoint=dict(type='CheckpointHook', interval=1))
    runner.train()
    assert full.windows == [1, 1, 2, 3, 4, 5, 6, 6, 6, 6, 6, 6]
    resumed = Recorder()
    torch.manual_seed(0)
    runner = _toy_runner(tmp_path / 'resumed', ToyModel(), [hook, resumed], max_epochs=3,
                         load_from=str(tmp_path / 'epoch_1.pth'), resume=True)
    runner.train()
    assert resumed.windows == full.windows[4:] == [4, 5, 6, 6, 6, 6, 6, 6]


def test_burn_in_reads_the_loop_counter_at_the_first_iteration(tmp_path):
    """Counters set as by mmengine's resume (epoch 1 of 4-iteration epochs): CBN from the start."""
    rec = Recorder()
    runner = _toy_runner(tmp_path, ToyModel(), [_StartAt(1, 4), dict(
        type='CBNBurnInHook', burn_in=1, window=3), rec])
    runner.train()
    assert rec.windows == [3, 3, 3, 3] and rec.lengths == [1, 2, 2, 2]


def test_window_at_follows_the_schedule():
    """CBNBurnInHook.window_at: burn-in, then the window, optionally through a linear ramp."""
    from types import SimpleNamespace
    from mmengine.logging import MMLogger
    runner = SimpleNamespace(model=nn.Sequential(CBN(4, window=4)), train_dataloader=range(10),
                             logger=MMLogger.get_current_instance())
    hook = CBNBurnInHook(burn_in=3, window=4)
    hook.before_train(runner)  # 10 iterations per epoch
    assert hook.window_at(29, 4) == 1 and hook.window_at(30, 4) == 4
    ramp = CBNBurnInHook(burn_in=1, ramp=2, window=8)
    ramp.before_train(runner)
    assert [ramp.window_at(i, 8) for i in (9, 10, 20, 29, 30, 100)] == [1, 2, 5, 7, 8, 8]
    by_iter = CBNBurnInHook(burn_in=5, by_epoch=False, window=4)
    by_iter.before_train(runner)
    assert [by_iter.window_at(i, 4) for i in (4, 5)] == [1, 4]


class RandomAugData(ToyData):
    """Random augmentation from all three generators: python, numpy and torch."""

    def __getitem__(self, i):
        import random
        import numpy as np
        aug = torch.tensor([random.random(), float(np.random.rand()), float(torch.rand(()))])
        return dict(inputs=self.x[i] * (1 + aug[0]) + aug[1] - aug[2], aug=aug)


class RandomModel(ToyModel):
    """Draws in its forward as well (dropout-like): the generator state matters between batches."""

    def __init__(self):
        super().__init__(window=3)
        self.draws = []

    def forward(self, inputs, aug=None, data_samples=None, mode='loss'):
        noise = torch.rand(inputs.shape[0], 1, 1, 1)
        self.draws.append((aug.clone(), noise.flatten().clone()))
        return super().forward(inputs * (0.5 + noise), data_samples, mode)


class LossRecorder(Hook):
    def __init__(self):
        self.losses = []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self.losses.append(outputs['loss'].detach().clone())


def _rng_runner(work_dir, by_epoch, **kw):
    torch.manual_seed(0)
    losses = LossRecorder()
    if by_epoch:
        train_cfg = dict(by_epoch=True, max_epochs=3)
        checkpoint = dict(type='CheckpointHook', interval=1)
        sampler = dict(type='DefaultSampler', shuffle=True)
    else:  # (an infinite sampler: mmengine pauses 2 s whenever it restarts a finite one)
        train_cfg = dict(by_epoch=False, max_iters=6)
        checkpoint = dict(type='CheckpointHook', interval=3, by_epoch=False)
        sampler = dict(type='InfiniteSampler', shuffle=True)
    kw.setdefault('experiment_name', _experiment_name())
    runner = Runner(
        model=RandomModel(), work_dir=str(work_dir),
        train_dataloader=dict(dataset=RandomAugData(n=4), batch_size=2, num_workers=0,
                              sampler=sampler,
                              collate_fn=dict(type='default_collate')),
        train_cfg=train_cfg, optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05)),
        custom_hooks=[dict(type='RNGStateHook'), losses],
        default_hooks=dict(logger=None, checkpoint=checkpoint), randomness=dict(seed=0),
        default_scope='mmdet', **kw)
    return runner, losses


@pytest.mark.parametrize('by_epoch', [False, True], ids=['iter-based', 'epoch-based'])
def test_rng_state_hook_resumed_run_draws_what_the_uninterrupted_run_draws(tmp_path, by_epoch):
    """Resumed from the checkpoint of iteration 3 (iteration-based: the loop first skips 3 batches
    through the random pipeline) or epoch 1: the same augmentations, the same draws in the model
    and the same losses as the uninterrupted run."""
    full, full_losses = _rng_runner(tmp_path, by_epoch)
    full.train()
    ckpt = 'epoch_1.pth' if by_epoch else 'iter_3.pth'
    done = 2 if by_epoch else 3  # iterations in the checkpoint
    resumed, resumed_losses = _rng_runner(tmp_path / 'resumed', by_epoch,
                                          load_from=str(tmp_path / ckpt), resume=True)
    resumed.train()
    expected, got = full.model.draws[done:], resumed.model.draws
    assert len(got) == len(expected) == 6 - done
    for (aug, noise), (aug_ref, noise_ref) in zip(got, expected):
        assert torch.equal(aug, aug_ref) and torch.equal(noise, noise_ref)
    assert torch.equal(torch.stack(resumed_losses.losses), torch.stack(full_losses.losses[done:]))


# ---------------------------------------------------------------- NormSwitchHook
class ThreeNormModel(BaseModel):
    """BN layers with their own eps/momentum, one in a ``neck`` part, one kept in eval mode by
    ``train()`` (as mmdet's ``norm_eval`` does)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4, eps=1e-3, momentum=0.05)
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False),
                                  nn.BatchNorm2d(4, eps=1e-4, momentum=0.2))
        self.frozen = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.head = nn.Linear(4, 1)

    def train(self, mode=True):
        super().train(mode)
        self.frozen[1].eval()
        return self

    def forward(self, inputs, data_samples=None, mode='loss'):
        feat = torch.relu(self.norm(self.conv(inputs)))
        feat = self.frozen(torch.relu(self.neck(feat)))
        out = self.head(feat.mean((2, 3)))
        return dict(loss=out.square().mean()) if mode == 'loss' else out


class NormWatch(Hook):
    priority = 'LOW'  # after NormSwitchHook

    def __init__(self):
        self.seen = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        m = runner.model
        self.seen.append({name: (type(layer).__name__, layer.training, layer.eps, layer.momentum)
                          for name, layer in (('norm', m.norm), ('neck', m.neck[1]),
                                              ('frozen', m.frozen[1]))})


def _switch_run(tmp_path, hook, max_epochs=2, start=None):
    watch = NormWatch()
    hooks = ([] if start is None else [_StartAt(*start)]) + [hook, watch]
    torch.manual_seed(0)
    runner = _toy_runner(tmp_path, ThreeNormModel(), hooks, max_epochs=max_epochs)
    runner.train()
    return runner, watch.seen


def test_norm_switch_at_an_iteration_keeps_train_flag_eps_and_momentum(tmp_path):
    """switch_iter=5 (mid-epoch, no model.train() before the next iteration): CBN from iteration 5
    on, each layer with its BN's eps, momentum and train/eval flag (the frozen one stays eval)."""
    runner, seen = _switch_run(tmp_path, dict(type='NormSwitchHook', switch_iter=5,
                                              to=dict(type='CBN', window=2)))
    assert [s['norm'][0] for s in seen] == ['BatchNorm2d'] * 5 + ['CrossIterationBatchNorm2d'] * 3
    assert all(s['neck'][0] == s['frozen'][0] == s['norm'][0] for s in seen)
    for s in seen[5:]:
        assert s['norm'] == ('CrossIterationBatchNorm2d', True, 1e-3, 0.05)
        assert s['neck'] == ('CrossIterationBatchNorm2d', True, 1e-4, 0.2)
        assert s['frozen'] == ('CrossIterationBatchNorm2d', False, 1e-5, 0.1)
    assert runner.model.frozen[1].history_length == 0  # eval mode: nothing recorded
    assert runner.model.norm.history_length == 1


def test_norm_switch_parts_switch_only_those_parts(tmp_path):
    runner, seen = _switch_run(tmp_path, dict(type='NormSwitchHook', switch_epoch=0,
                                              parts=('neck', ), to=dict(type='CBN', window=2)),
                               max_epochs=1)
    assert all(s['neck'][0] == 'CrossIterationBatchNorm2d' for s in seen)
    assert all(s['norm'][0] == s['frozen'][0] == 'BatchNorm2d' for s in seen)


@pytest.mark.parametrize('when', [dict(switch_epoch=1), dict(switch_iter=5)])
def test_norm_switch_past_the_switch_point_switches_at_the_first_iteration(tmp_path, when):
    """Counters set as by mmengine's resume to epoch 2 (iteration 8), past the switch point."""
    _, seen = _switch_run(tmp_path, dict(type='NormSwitchHook', to=dict(type='CBN', window=2),
                                         **when), max_epochs=3, start=(2, 8))
    assert len(seen) == 4
    assert all(s[name][0] == 'CrossIterationBatchNorm2d' for s in seen for name in s)


def test_switch_norm_layers_keeps_every_bn_setting():
    from cbn_mmdet.engine.hooks import switch_norm_layers
    model = nn.Sequential(nn.BatchNorm2d(4, eps=1e-3, momentum=None, affine=False,
                                         track_running_stats=False), nn.BatchNorm2d(4))
    model[0].eval()
    assert switch_norm_layers(model, dict(type='CBN', window=3), (nn.BatchNorm2d, )) == 2
    first, second = model
    assert isinstance(first, CBN) and isinstance(second, CBN)
    assert (first.eps, first.momentum, first.affine, first.track_running_stats, first.training,
            first.window) == (1e-3, None, False, False, False, 3)
    assert (second.eps, second.momentum, second.affine, second.track_running_stats,
            second.training) == (1e-5, 0.1, True, True, True)


@pytest.mark.parametrize('hook', ['CBNBurnInHook', 'CBNMonitorHook', 'NormSwitchHook',
                                  'RNGStateHook'])
def test_hooks_live_in_mmengines_root_registry(hook):
    """Registered where mmengine's own hooks are, so every OpenMMLab codebase's configs find them."""
    from mmdet.registry import HOOKS as MMDET_HOOKS
    from mmengine.registry import HOOKS
    assert hook in HOOKS.module_dict
    assert MMDET_HOOKS.get(hook) is HOOKS.get(hook)
