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


def test_dist_train_two_processes_keep_their_own_cbn_history(tmp_path, tiny_demo_data):
    """tools/dist_train.sh CONFIG 2 on CPU: two gloo ranks train 3 iterations and validate, each CBN
    layer with its own statistics."""
    config = tmp_path / 'cbn_dist.py'
    config.write_text(f'''
_base_ = [{CONFIG!r}]
# replaces the dataset base's custom_imports: cbn_mmdet_demo registers DemoShapesDataset
custom_imports = dict(imports=['cbn_mmdet', 'cbn_mmdet_demo', 'dump_cbn_state_hook'],
                      allow_failed_imports=False)
head_cbn = dict(type='CBN', window=3, requires_grad=True)
model = dict(neck=dict(norm_cfg=head_cbn), roi_head=dict(bbox_head=dict(norm_cfg=head_cbn)))
custom_hooks = [dict(type='CBNBurnInHook', burn_in=0, by_epoch=False),
                dict(type='DumpCBNStateHook')]
''')
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    env = dict(os.environ, PORT=port, PYTHON=sys.executable,
               PYTHONPATH=os.pathsep.join([REPO_ROOT, osp.join(REPO_ROOT, 'tests', 'helpers')]))
    opts = tiny_overrides(tiny_demo_data, 3, interval=3) + ['env_cfg.dist_cfg.backend=gloo',
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
    for name in ranks[0]:
        a, b = ranks[0][name], ranks[1][name]
        assert int(a['history_index'][1]) == 2  # 3 iterations: 2 past entries held
        # each process normalised with its own statistics (different images per rank)
        assert not torch.allclose(a['history_mean'], b['history_mean']), name
        assert not torch.allclose(a['running_mean'], b['running_mean']), name
