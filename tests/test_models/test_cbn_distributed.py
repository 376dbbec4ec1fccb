"""CBN under torch.distributed (2 CPU processes, gloo) through a real mmengine Runner + DDP."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

WORKER = os.path.join(REPO_ROOT, 'tests', 'helpers', 'dist_cbn_worker.py')

pytestmark = pytest.mark.slow


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


def _run_two(work_dir, *extra):
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), '2', port, str(work_dir), *extra],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]


def test_switch_to_cbn_under_ddp_keeps_per_process_history_and_resumes_from_rank0(tmp_path):
    """BN → CBN at epoch 1 in a 2-process DDP run with SyncBuffersHook: the same tensors and
    optimizer state, parameters in sync, running statistics averaged, but a history per process;
    the checkpoint (rank 0's) restores rank 0's history on both processes after a switch on resume."""
    _run_two(tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    for r in ranks:
        assert r['type'] == 'CrossIterationBatchNorm2d'
        assert r['same_weight'] and r['in_optimizer'] and r['has_momentum']
    for name, value in ranks[0]['params'].items():  # DDP still averages every gradient
        torch.testing.assert_close(value, ranks[1]['params'][name])
    states = [r['state'] for r in ranks]
    # SyncBuffersHook averaged the running statistics (buffers) ...
    torch.testing.assert_close(states[0]['running_mean'], states[1]['running_mean'])
    torch.testing.assert_close(states[0]['running_var'], states[1]['running_var'])
    # ... but each process kept its own history: statistics are per GPU, with no collective in CBN
    assert int(states[0]['history_index'][1]) == 2 and torch.equal(states[0]['history_index'],
                                                                   states[1]['history_index'])
    assert not torch.allclose(states[0]['history_mean'], states[1]['history_mean'])
    assert not torch.allclose(states[0]['history_var_grad'], states[1]['history_var_grad'])
    _run_two(tmp_path, '--resume')
    for r in range(2):
        resumed = torch.load(tmp_path / f'resumed_rank{r}.pt', weights_only=True)
        assert resumed['type'] == 'CrossIterationBatchNorm2d'
        for key in ('history_mean', 'history_var_grad', 'history_index'):
            torch.testing.assert_close(resumed['state'][key], states[0][key])


def test_switch_to_sync_cbn_checkpoint_resumes_each_process_with_its_own_history(tmp_path):
    """BN → SyncCBN under DDP: each process keeps the history of its own batches; mmengine's
    checkpoint (written by rank 0) holds both, and resuming gives each process its own."""
    _run_two(tmp_path, '--sync')
    states = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True)['state'] for r in range(2)]
    assert not torch.allclose(states[0]['history_mean'], states[1]['history_mean'])
    checkpoint = torch.load(tmp_path / 'epoch_2.pth', weights_only=False)['state_dict']
    for r in range(2):
        torch.testing.assert_close(checkpoint[f'norm.rank{r}_history_var_grad'],
                                   states[r]['history_var_grad'])
    _run_two(tmp_path, '--sync', '--resume')
    for r in range(2):
        resumed = torch.load(tmp_path / f'resumed_rank{r}.pt', weights_only=True)
        assert resumed['type'] == 'SyncCrossIterationBatchNorm2d'
        for key in ('history_mean', 'history_var_grad', 'history_index'):
            torch.testing.assert_close(resumed['state'][key], states[r][key])
