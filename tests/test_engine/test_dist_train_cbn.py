"""tools/dist_train.sh with 2 CPU processes (gloo) trains CBN with per-process statistics."""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT
from tiny_runs import CONFIG, tiny_overrides

pytestmark = pytest.mark.slow


def _dist_train(tmp_path, data_root, norm='CBN'):
    """tools/dist_train.sh with 2 gloo ranks, 3 iterations and a validation, ``norm`` in the FPN and
    the box head; returns each rank's CBN layers' state dicts (DumpCBNStateHook)."""
    config = tmp_path / 'cbn_dist.py'
    config.write_text(f'''
_base_ = [{CONFIG!r}]
# replaces the dataset base's custom_imports: cbn_mmdet_demo registers DemoShapesDataset
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo', 'dump_cbn_state_hook'],
                      allow_failed_imports=False)
head_cbn = dict(type={norm!r}, window=3, requires_grad=True)
model = dict(neck=dict(norm_cfg=head_cbn), roi_head=dict(bbox_head=dict(norm_cfg=head_cbn)))
custom_hooks = [dict(type='CBNBurnInHook', burn_in=0, by_epoch=False),
                dict(type='DumpCBNStateHook')]
''')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PORT=port, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([REPO_ROOT, osp.join(REPO_ROOT, 'tests', 'helpers')]))
    opts = tiny_overrides(data_root, 3, interval=3) + ['env_cfg.dist_cfg.backend=gloo',
                                                       'train_dataloader.batch_size=1']
    proc = subprocess.run(['bash', 'tools/dist_train.sh', str(config), '2', '--work-dir',
                           str(tmp_path / 'work'), '--cfg-options', *opts], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert 'Distributed launcher: pytorch' in log and 'Distributed training: True' in log
    assert 'GPU number: 2' in log
    assert re.search(r'Iter\(train\) \[3/3\]', log), log[-3000:]
    assert re.search(r'Iter\(val\) \[1/1\]', log), log[-3000:]  # validation ran distributed too
    assert torch.load(tmp_path / 'work' / 'iter_3.pth', map_location='cpu')['meta']['iter'] == 3
    ranks = [torch.load(tmp_path / 'work' / f'cbn_state_rank{r}.pt', weights_only=True)
             for r in range(2)]
    assert set(ranks[0]) == set(ranks[1]) and len(ranks[0]) == 12  # 4 + 4 FPN, 4 head convs
    return ranks


def test_dist_train_two_processes_keep_their_own_cbn_history(tmp_path, tiny_demo_data):
    """tools/dist_train.sh CONFIG 2 on CPU: two gloo ranks train 3 iterations and validate, each CBN
    layer with its own statistics."""
    ranks = _dist_train(tmp_path, tiny_demo_data)
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert int(a['history_index'][1]) == 2  # 3 iterations: 2 past entries held
        # each process normalised with its own statistics (different images per rank)
        assert not torch.allclose(a['history_mean'], b['history_mean']), name
        assert not torch.allclose(a['running_mean'], b['running_mean']), name


def test_dist_train_sync_cbn_pools_statistics_across_processes(tmp_path, tiny_demo_data):
    """The same with SyncCBN: each process keeps the history of its own images, the statistics used
    (hence the running ones) are the same bits on both, and the checkpoint holds both processes'
    histories. (``sync_bn='SyncCBN'`` would also make the backbone's BN torch's SyncBatchNorm, which
    DDP refuses on CPU.)"""
    ranks = _dist_train(tmp_path, tiny_demo_data, 'SyncCBN')
    checkpoint = torch.load(tmp_path / 'work' / 'iter_3.pth', map_location='cpu')['state_dict']
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert int(a['history_index'][1]) == 2 and a['history_processes'].tolist()[:2] == [2, 0]
        assert not torch.allclose(a['history_mean'], b['history_mean']), name
        assert torch.equal(a['running_mean'], b['running_mean']), name
        assert torch.equal(a['running_var'], b['running_var']), name
        for r, state in enumerate(ranks):
            torch.testing.assert_close(checkpoint[f'{name}.rank{r}_history_var_grad'],
                                       state[name]['history_var_grad'])
