"""CBN hooks and runner guards, through a real mmengine Runner on a toy model."""
import pytest
import torch
import torch.nn as nn
from mmengine.hooks import Hook
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine.hooks import CBNBurnInHook, auto_window
from cbn_mmdet.engine.sync_bn_guard import SyncBNWithCBNError
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


def _runner(tmp_path, hook_cfg, max_epochs=3, window=4, **kw):
    recorder = Recorder()
    runner = Runner(
        model=ToyModel(window), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        custom_hooks=[hook_cfg, recorder], default_hooks=dict(logger=None, checkpoint=None),
        default_scope='mmdet', **kw)
    return runner, recorder


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


def test_burn_in_is_derived_from_runner_iter():
    hook = CBNBurnInHook(burn_in=3, window=4)
    hook._iters_per_epoch = 10
    assert hook.window_at(29, 4) == 1 and hook.window_at(30, 4) == 4
    ramp = CBNBurnInHook(burn_in=1, ramp=2, window=8)
    ramp._iters_per_epoch = 10
    assert [ramp.window_at(i, 8) for i in (9, 10, 20, 29, 30, 100)] == [1, 2, 5, 7, 8, 8]


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
    newest = norm.history_mean[norm.history_slots()[0]].clone()
    norm.set_window(2)
    assert norm.window == 2 and norm.active_window == 2 and norm.history_length == 1
    torch.testing.assert_close(norm.history_mean[norm.history_slots()[0]], newest)
    norm.set_window(6)
    assert norm.history_length == 1 and norm.history_mean.shape[0] == 5


def test_sync_bn_conversion_refuses_cbn():
    import mmengine.runner.runner as runner_module
    model = nn.Sequential(nn.Conv2d(3, 4, 3), CBN(4), nn.BatchNorm2d(4))
    with pytest.raises(SyncBNWithCBNError, match='CBN layers'):
        runner_module.convert_sync_batchnorm(model, 'torch')
    plain = runner_module.convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), 'torch')
    assert isinstance(plain[0], nn.SyncBatchNorm)


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

    runner = Runner(
        model=BNToyModel(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        custom_hooks=[dict(type='NormSwitchHook', switch_epoch=1, to=dict(type='CBN', window=2)),
                      Watch()],
        default_hooks=dict(logger=None, checkpoint=None), default_scope='mmdet')
    runner.train()
    assert seen[0][0] is nn.BatchNorm2d and seen[1][0] is CBN
    assert seen[1][1] is seen[0][1] and seen[1][2] is seen[0][2]  # the same tensors
    opt = runner.optim_wrapper.optimizer
    assert any(p is runner.model.norm.weight for g in opt.param_groups for p in g['params'])
    assert 'momentum_buffer' in opt.state[runner.model.norm.weight]
    assert runner.model.norm.history_length == 1
    assert runner.model.norm.last_bind_status == 'conv'


def test_norm_switch_hook_to_syncbn_refuses_single_process(tmp_path):
    runner = Runner(
        model=BNToyModel(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=1),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01)),
        custom_hooks=[dict(type='NormSwitchHook', switch_epoch=0)],
        default_hooks=dict(logger=None, checkpoint=None), default_scope='mmdet')
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


def test_monitor_hook_logs_correction_size(tmp_path):
    from mmengine.logging import MessageHub
    runner, rec = _runner(tmp_path, dict(type='CBNMonitorHook', interval=2), max_epochs=1,
                          window=3)
    runner.train()
    hub = runner.message_hub
    avg = hub.get_scalar('train/cbn/correction_var_avg').current()
    assert runner.model.norm.monitor is True
    assert avg > 0  # weights moved, so Eqs. 7-8 moved the statistics


def test_monitor_matches_direct_computation():
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    norm = CBN(4, window=3, monitor=True).double()
    opt = torch.optim.SGD(list(conv.parameters()) + list(norm.parameters()), lr=0.5)
    from cbn_mmdet.ops.statistics import compensate_history
    for i in range(4):
        x = torch.randn(2, 3, 6, 6, dtype=torch.float64)
        if i == 3:  # recompute what the layer will see: the 2 entries held (window 3)
            valid = torch.zeros(2, dtype=torch.float64)
            assert len(norm.history_slots()) == 2
            valid[norm.history_slots()] = 1
            mean, var = compensate_history(
                norm.history_mean, norm.history_var, norm.history_mean_ref, norm.history_var_ref,
                norm.history_patch_mean, norm.history_var_grad, norm.history_compensable,
                conv.weight.detach(), conv.bias.detach(), 1)
            rel = ((mean - norm.history_mean).abs() / (norm.history_var + norm.eps).sqrt())
            expected = (rel * valid.unsqueeze(1)).sum() / (valid.sum() * 4)
        norm(conv(x)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    torch.testing.assert_close(norm.last_correction['mean'], expected)
    assert expected > 0


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
    return Runner(
        model=BNToyModel(), work_dir=str(tmp_path),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        custom_hooks=[dict(type='NormSwitchHook', switch_epoch=1, to=dict(type='CBN', window=3)),
                      *hooks],
        default_hooks=dict(logger=None, checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume, default_scope='mmdet', randomness=dict(seed=0))


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
