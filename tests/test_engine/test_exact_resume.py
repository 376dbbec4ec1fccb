"""A CBN detector killed with SIGKILL and resumed with --resume continues bit for bit.

Through tools/train.py on the tiny demo data: an uninterrupted run, and a run killed after a
checkpoint and resumed; the per-iteration losses after the checkpoint must be identical (the CBN window
history, the burn-in state and the RNG states all come back). A second case puts the checkpoint inside
the burn-in, so the resumed run crosses the switch to CBN.
"""
import glob
import json
import os
import os.path as osp
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT
from tiny_runs import CONFIG, tiny_overrides

pytestmark = pytest.mark.slow

MAX_ITERS = 8


def _write_config(tmp_path, burn_in):
    path = tmp_path / 'cbn_resume.py'
    path.write_text(f'''
_base_ = [{CONFIG!r}]
head_cbn = dict(type='CBN', window=3, requires_grad=True)
model = dict(neck=dict(norm_cfg=head_cbn), roi_head=dict(bbox_head=dict(norm_cfg=head_cbn)))
custom_hooks = [dict(type='CBNBurnInHook', burn_in={burn_in}, by_epoch=False),
                dict(type='RNGStateHook')]
randomness = dict(seed=0, deterministic=True)
''')
    return str(path)


def _cmd(config, work_dir, data_root, *extra):
    opts = tiny_overrides(data_root, MAX_ITERS, interval=3)
    opts = [o for o in opts if not o.startswith('train_cfg.val_interval')] + [
        f'train_cfg.val_interval={MAX_ITERS}']
    return [sys.executable, 'tools/train.py', config, '--work-dir', str(work_dir), *extra,
            '--cfg-options', *opts]


def _env():
    return dict(os.environ, PYTHONPATH=REPO_ROOT)


def _losses(work_dir):
    """iteration -> loss from every log of the work dir (later runs override earlier ones)."""
    found = {}
    for path in sorted(glob.glob(osp.join(work_dir, '*', 'vis_data', 'scalars.json'))):
        with open(path) as f:
            for line in f:
                rec = json.loads(line)
                if 'loss' in rec and 'iter' in rec:
                    found[rec['iter']] = rec['loss']
    return found


def _run(cmd):
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    return proc.stdout + proc.stderr


def _wait_for_checkpoint(work_dir, name, proc, timeout=600):
    """Poll until mmengine has finished writing ``work_dir/name``: its CheckpointHook names a
    checkpoint in ``last_checkpoint`` only once the file is complete. False if the run ended first."""
    marker = osp.join(work_dir, 'last_checkpoint')
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if osp.exists(marker):
            with open(marker) as f:
                if osp.basename(f.read().strip()) == name:
                    return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise AssertionError(f'{name} was not written within {timeout} s')


def _run_killed_after_checkpoint(cmd, work_dir, name):
    proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        written = _wait_for_checkpoint(work_dir, name, proc)
        finished = proc.poll() is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert written and not finished, 'the run ended before it could be killed'


@pytest.mark.parametrize('burn_in', [2, 5], ids=['checkpoint-after-burn-in',
                                                 'resume-crosses-burn-in'])
def test_sigkill_and_resume_repeats_the_uninterrupted_losses(tmp_path, tiny_demo_data, burn_in):
    config = _write_config(tmp_path, burn_in)
    straight = tmp_path / 'straight'
    _run(_cmd(config, straight, tiny_demo_data))
    expected = _losses(str(straight))
    assert sorted(expected) == list(range(1, MAX_ITERS + 1))

    killed = tmp_path / 'killed'
    _run_killed_after_checkpoint(_cmd(config, killed, tiny_demo_data), str(killed), 'iter_3.pth')
    log = _run(_cmd(config, killed, tiny_demo_data, '--resume'))
    # resumed from iteration 3 (not from a later checkpoint written before the kill)
    assert f'Auto resumed from the latest checkpoint {killed / "iter_3.pth"}' in log
    assert 'resumed epoch: 0, iter: 3' in log
    got = _losses(str(killed))
    assert 'CBN with window 3' in log  # CBN is on in the resumed part
    for it in range(4, MAX_ITERS + 1):
        assert got[it] == expected[it], (it, got[it], expected[it])
