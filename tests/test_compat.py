"""cbn_mmdet.compat: checkpoint loading under torch's restricted unpickler, distributed init on CPU.

The checkpoints here are written by a real mmengine ``Runner`` (message hub with HistoryBuffers,
SGD momentum state, a param scheduler), so a change in what mmengine pickles shows up as a failure.
"""
import io
import os
import os.path as osp
import pickle
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import cbn_mmdet  # noqa: F401  (applies the fixes)
from cbn_mmdet import compat

from mmengine.logging import HistoryBuffer  # noqa: E402
from mmengine.model import BaseModel  # noqa: E402
from mmengine.runner import Runner, load_checkpoint  # noqa: E402

from conftest import REPO_ROOT as REPO  # noqa: E402


class ToyModel(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, inputs, data_samples=None, mode='tensor'):
        x = torch.stack(inputs) if isinstance(inputs, (list, tuple)) else inputs
        out = self.linear(x).squeeze(-1)
        if mode == 'loss':
            return dict(loss=F.mse_loss(out, torch.stack(data_samples)))
        return out


class ToyDataset(torch.utils.data.Dataset):
    metainfo = dict(classes=('a', 'b'))

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.data = torch.randn(8, 2, generator=g)
        self.label = torch.randn(8, generator=g)

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return dict(inputs=self.data[i], data_samples=self.label[i])


def make_runner(work_dir, max_iters, **kwargs):
    return Runner(
        model=ToyModel(),
        work_dir=str(work_dir),
        experiment_name=f'compat-{uuid.uuid4().hex}',
        train_dataloader=dict(dataset=ToyDataset(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False)),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.01, momentum=0.9)),
        param_scheduler=dict(type='MultiStepLR', milestones=[1], by_epoch=False),
        train_cfg=dict(by_epoch=False, max_iters=max_iters),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=2, by_epoch=False),
                           logger=dict(type='LoggerHook', interval=1)),
        randomness=dict(seed=0),
        default_scope='mmengine',
        **kwargs)


@pytest.fixture(scope='module')
def runner_checkpoint(tmp_path_factory):
    """A checkpoint written by mmengine's Runner after 2 SGD iterations, and the runner."""
    work_dir = tmp_path_factory.mktemp('compat_ckpt')
    runner = make_runner(work_dir, max_iters=2)
    runner.train()
    path = osp.join(work_dir, 'iter_2.pth')
    assert osp.isfile(path)
    return path, runner


class _Evil:
    """A pickle payload that runs ``func(*args)`` when unpickled."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    return [_Evil(os.system, f'touch {marker}'),  # a blocklisted module
            _Evil(exec, f'open({str(marker)!r}, "w").close()'),  # an ordinary builtin
            _Evil(subprocess.call, ['touch', str(marker)])]


def test_runner_checkpoint_needs_the_allow_list(runner_checkpoint):
    """What mmengine writes is outside torch's defaults: this is why the fix exists."""
    path, _ = runner_checkpoint
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    saved = torch.serialization.get_safe_globals()
    torch.serialization.clear_safe_globals()
    try:  # what torch alone would refuse
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    finally:
        torch.serialization.add_safe_globals(saved)
    assert torch.serialization.get_unsafe_globals_in_checkpoint(path) == []
    assert 'mmengine.logging.history_buffer.HistoryBuffer' in unsafe
    assert 'builtins.getattr' in unsafe  # HistoryBuffer.mean etc. pickled as getattr(cls, name)
    allowed = {entry[1] if isinstance(entry, tuple) else f'{entry.__module__}.{entry.__qualname__}'
               for entry in compat.checkpoint_safe_globals()}
    assert unsafe <= allowed, f'not allow-listed: {sorted(unsafe - allowed)}'


def test_torch_load_default_weights_only(runner_checkpoint):
    path, runner = runner_checkpoint
    ckpt = torch.load(path, map_location='cpu')  # weights_only=True is torch's default
    assert ckpt['meta']['iter'] == 2
    buf = ckpt['message_hub']['log_scalars']['train/loss']
    assert isinstance(buf, HistoryBuffer)
    live = runner.message_hub.get_scalar('train/loss')
    np.testing.assert_array_equal(buf.data[0], live.data[0])
    assert len(buf.data[0]) == 2
    assert buf.mean() == pytest.approx(float(np.mean(live.data[0])))
    assert 'momentum_buffer' in ckpt['optimizer']['state'][0]


def test_load_checkpoint_restores_weights(runner_checkpoint):
    path, runner = runner_checkpoint
    model = ToyModel()
    load_checkpoint(model, path, map_location='cpu')
    torch.testing.assert_close(model.linear.weight, runner.model.linear.weight.detach())
    torch.testing.assert_close(model.linear.bias, runner.model.linear.bias.detach())


def test_runner_resume_restores_iter_optimizer_and_history(runner_checkpoint, tmp_path):
    path, old = runner_checkpoint
    runner = make_runner(tmp_path, max_iters=4, resume=True, load_from=path)
    runner.resume(path)
    assert runner.iter == 2
    saved = torch.load(path, map_location='cpu')
    state = runner.optim_wrapper.optimizer.state_dict()['state']
    torch.testing.assert_close(state[0]['momentum_buffer'],
                               saved['optimizer']['state'][0]['momentum_buffer'])
    np.testing.assert_array_equal(runner.message_hub.get_scalar('train/loss').data[0],
                                  old.message_hub.get_scalar('train/loss').data[0])
    # The MultiStepLR milestone (iter 1) has passed: the lr stays decayed after resuming.
    assert runner.optim_wrapper.get_lr()['lr'][0] == pytest.approx(0.001)


def test_runner_resume_then_train_continues(runner_checkpoint, tmp_path):
    path, _ = runner_checkpoint
    runner = make_runner(tmp_path, max_iters=4, resume=True, load_from=path)
    runner.train()
    assert runner.iter == 4
    assert osp.isfile(osp.join(tmp_path, 'iter_4.pth'))
    assert not osp.exists(osp.join(tmp_path, 'iter_2.pth'))  # it did not restart from 0
    buf = torch.load(osp.join(tmp_path, 'iter_4.pth'))['message_hub']['log_scalars']['train/loss']
    assert len(buf.data[0]) == 4  # 2 resumed + 2 new loss values


@pytest.mark.parametrize('which', range(3))
def test_malicious_pickle_refused_everywhere(tmp_path, which):
    marker = tmp_path / 'pwned'
    path = str(tmp_path / 'evil.pth')
    torch.save({'state_dict': {}, 'meta': {'iter': 2, 'epoch': 0},
                'x': _payloads(marker)[which]}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(ToyModel(), path)  # load_from / tools/test.py CKPT
    runner = make_runner(tmp_path / 'wd', max_iters=4, resume=True, load_from=path)
    with pytest.raises(pickle.UnpicklingError):
        runner.resume(path)  # --resume PATH
    assert not marker.exists()
    # The same file does run its payload under an unrestricted load: the test can fail.
    if which == 2:
        torch.load(path, weights_only=False)
        assert marker.exists()


class _GetattrEscape:
    """Uses pickle's getattr route to reach something other than a HistoryBuffer method."""

    def __init__(self, obj, name):
        self.obj, self.name = obj, name

    def __reduce__(self):
        return getattr, (self.obj, self.name)


@pytest.mark.parametrize('obj,name', [(HistoryBuffer, '__init__'), (HistoryBuffer, '__class__'),
                                      (np.ndarray, '__subclasses__'), (HistoryBuffer, 'update')])
def test_getattr_allow_list_is_restricted(tmp_path, obj, name):
    path = str(tmp_path / 'escape.pth')
    torch.save({'x': _GetattrEscape(obj, name)}, path)
    with pytest.raises(pickle.UnpicklingError, match='refused getattr'):
        torch.load(path)


def test_history_buffer_methods_through_getattr(tmp_path):
    path = str(tmp_path / 'methods.pth')
    torch.save({m: _GetattrEscape(HistoryBuffer, m) for m in compat.HISTORY_BUFFER_METHODS}, path)
    loaded = torch.load(path)
    assert loaded == {m: getattr(HistoryBuffer, m) for m in compat.HISTORY_BUFFER_METHODS}


def test_numpy1_module_names_load(tmp_path):
    """Checkpoints written under numpy 1.x name ``numpy.core.multiarray``; they load too."""
    buf = io.BytesIO()
    torch.save({'h': HistoryBuffer([1.0, 2.0], [1, 1]), 's': np.float64(3.5)}, buf,
               _use_new_zipfile_serialization=False)
    data = buf.getvalue().replace(b'numpy._core.multiarray', b'numpy.core.multiarray')
    assert b'numpy.core.multiarray' in data
    loaded = torch.load(io.BytesIO(data))
    assert loaded['h'].mean() == pytest.approx(1.5)
    assert loaded['s'] == 3.5


def test_apply_is_idempotent():
    from mmengine.dist import utils as dist_utils
    before = dist_utils._init_dist_pytorch
    compat.apply()
    assert dist_utils._init_dist_pytorch is before
    assert getattr(before, '__wrapped_by_cbn_mmdet__', False)


@pytest.mark.skipif(torch.cuda.is_available(), reason='tests the path for machines without CUDA')
def test_dist_init_and_ddp_without_cuda(tmp_path):
    """mmengine's pytorch launcher on CPU: nccl falls back to gloo, DDP wraps a CPU module."""
    script = textwrap.dedent('''
        import os, warnings
        import torch
        import cbn_mmdet  # noqa
        from mmengine.dist import init_dist, get_world_size
        from mmengine.model import MMDistributedDataParallel
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            init_dist('pytorch', backend='nccl')
        assert any('gloo' in str(x.message) for x in w), [str(x.message) for x in w]
        assert torch.distributed.get_backend() == 'gloo'
        assert get_world_size() == 1
        ddp = MMDistributedDataParallel(module=torch.nn.Linear(2, 1), device_ids=[0],
                                        broadcast_buffers=False)
        assert ddp.device_ids is None
        ddp(torch.ones(3, 2)).sum().backward()
        torch.distributed.destroy_process_group()
        print('DIST_OK')
    ''')
    env = dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1',
               MASTER_PORT=str(29400 + os.getpid() % 500))
    proc = subprocess.run([sys.executable, '-c', script], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert 'DIST_OK' in proc.stdout
