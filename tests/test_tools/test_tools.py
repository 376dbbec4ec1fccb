"""End to end through tools/train.py, tools/test.py and tools/dist_train.sh (subprocesses, CPU).

A tiny run of the demo Faster R-CNN config on :func:`tiny_demo_data` (4 train / 2 val images of
64 px, few proposals and RoIs: ``tools/short_run.py``): train 2 iterations with validation, resume to
iteration 4 and evaluate the last checkpoint with tools/test.py. (tools/dist_train.sh:
tests/test_engine/test_dist_train_cbn.py.)
"""
import argparse
import glob
import json
import os
import os.path as osp
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config, DictAction

import cbn_mmdet  # noqa: F401  (torch.load of mmengine checkpoints)

from conftest import REPO_ROOT  # noqa: E402

from short_run import shrink_config  # noqa: E402
from tiny_runs import CONFIG, schedule_overrides, tiny_overrides  # noqa: E402

TIMEOUT = 300

pytestmark = pytest.mark.skipif(not osp.isfile(CONFIG), reason=f'{CONFIG} is missing')


def parse_overrides(opts):
    """``opts`` as tools/train.py parses ``--cfg-options``."""
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    return parser.parse_args(['--cfg-options', *opts]).cfg_options


def run(cmd, env_extra=None):
    env = dict(os.environ, PYTHONPATH=REPO_ROOT, **(env_extra or {}))
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f'{cmd} failed ({proc.returncode}):\n{out[-6000:]}'
    return out


def train(work_dir, data_root, max_iters, *extra):
    return run([sys.executable, 'tools/train.py', CONFIG, '--work-dir', str(work_dir), *extra,
                '--cfg-options', *tiny_overrides(data_root, max_iters)])


def losses(ckpt):
    return ckpt['message_hub']['log_scalars']['train/loss'].data[0]


def test_tiny_overrides_give_the_shrunk_config(tmp_path):
    """Parsed as tools/train.py parses them, the options turn the demo config into shrink_config's."""
    cfg = Config.fromfile(CONFIG)
    cfg.merge_from_dict(parse_overrides(tiny_overrides(str(tmp_path), 7, interval=3)))
    expected = shrink_config(Config.fromfile(CONFIG), str(tmp_path))
    expected.merge_from_dict(parse_overrides(schedule_overrides(7, 3)))
    assert cfg.to_dict() == expected.to_dict()
    assert cfg.train_dataloader.dataset.data_root == str(tmp_path) + '/'
    assert cfg.train_dataloader.dataset.generate is False and cfg.train_dataloader.batch_size == 2
    assert cfg.model.test_cfg.rcnn.max_per_img == 20 and cfg.train_cfg.val_interval == 3


@pytest.fixture(scope='module')
def trained(tiny_demo_data, tmp_path_factory):
    """2 iterations + val, then ``--resume`` to iteration 4: work_dir and both logs."""
    work_dir = tmp_path_factory.mktemp('tools_train')
    first = train(work_dir, tiny_demo_data, 2)
    ckpt1 = torch.load(osp.join(work_dir, 'iter_2.pth'), map_location='cpu')
    second = train(work_dir, tiny_demo_data, 4, '--resume')
    return dict(work_dir=str(work_dir), first=first, second=second, ckpt1=ckpt1)


@pytest.mark.slow
def test_train_runs_two_iterations_and_validates(trained):
    log, ckpt = trained['first'], trained['ckpt1']
    assert re.search(r'Iter\(train\) \[2/2\]', log), log[-3000:]
    assert not re.search(r'Iter\(train\) \[3/', log)
    assert re.search(r'Iter\(val\) \[1/1\].*coco/bbox_mAP: ', log), log[-3000:]
    assert ckpt['meta']['iter'] == 2
    assert len(losses(ckpt)) == 2
    assert {'state_dict', 'optimizer', 'message_hub', 'param_schedulers'} <= set(ckpt)


@pytest.mark.slow
def test_resume_continues_from_the_checkpoint(trained):
    log, work_dir, ckpt1 = trained['second'], trained['work_dir'], trained['ckpt1']
    iter2 = osp.join(work_dir, 'iter_2.pth')
    assert f'Auto resumed from the latest checkpoint {iter2}' in log
    assert 'resumed epoch: 0, iter: 2' in log
    # The resumed run trains iterations 3 and 4 only, never 1 and 2 again.
    assert re.search(r'Iter\(train\) \[4/4\]', log), log[-3000:]
    assert re.search(r'Iter\(train\) \[3/4\]', log)
    assert not re.search(r'Iter\(train\) \[[12]/4\]', log)
    ckpt2 = torch.load(osp.join(work_dir, 'iter_4.pth'), map_location='cpu')
    assert ckpt2['meta']['iter'] == 4
    # The message hub came from iter_2.pth: its two losses followed by two new ones.
    assert len(losses(ckpt2)) == 4
    np.testing.assert_array_equal(losses(ckpt2)[:2], losses(ckpt1))
    # Training went on from iteration 2's weights and optimizer state.
    assert ckpt2['optimizer']['state'].keys() == ckpt1['optimizer']['state'].keys()
    moved = [k for k, v in ckpt2['state_dict'].items()
             if v.is_floating_point() and not torch.equal(v, ckpt1['state_dict'][k])]
    assert moved
    with open(osp.join(work_dir, 'last_checkpoint')) as f:
        assert f.read().strip() == osp.join(work_dir, 'iter_4.pth')


@pytest.mark.slow
def test_test_py_evaluates_checkpoint(trained, tiny_demo_data, tmp_path):
    ckpt = osp.join(trained['work_dir'], 'iter_4.pth')
    log = run([sys.executable, 'tools/test.py', CONFIG, ckpt, '--work-dir', str(tmp_path),
               '--cfg-options', *tiny_overrides(tiny_demo_data, 4)])
    assert f'Load checkpoint from {ckpt}' in log
    assert 'do not match exactly' not in log and 'unexpected key' not in log
    assert 'Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all' in log
    results = glob.glob(osp.join(tmp_path, '*', '*.json'))
    assert len(results) == 1, results
    with open(results[0]) as f:
        metrics = json.loads(f.read().strip().splitlines()[-1])
    assert 0.0 <= metrics['coco/bbox_mAP'] <= 1.0
