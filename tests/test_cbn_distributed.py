"""CBN under torch.distributed (2 CPU processes, gloo) through a real mmengine Runner + DDP."""
import os
import socket
import subprocess
import sys

import torch

WORKER = os.path.join(os.path.dirname(__file__), 'helpers', 'dist_cbn_worker.py')


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


def test_per_process_history_survives_sync_buffers_and_resumes_from_rank0(tmp_path):
    _run_two(tmp_path)
    ranks = [torch.load(tmp_path / f'rank{r}.pt', weights_only=True) for r in range(2)]
    # SyncBuffersHook averaged the running statistics (buffers) ...
    torch.testing.assert_close(ranks[0]['running_mean'], ranks[1]['running_mean'])
    torch.testing.assert_close(ranks[0]['running_var'], ranks[1]['running_var'])
    # ... but each process kept its own history: statistics are per GPU, with no collective in CBN
    assert int(ranks[0]['history_index'][1]) == 2 and torch.equal(ranks[0]['history_index'],
                                                                  ranks[1]['history_index'])
    assert not torch.allclose(ranks[0]['history_mean'], ranks[1]['history_mean'])
    assert not torch.allclose(ranks[0]['history_var_grad'], ranks[1]['history_var_grad'])
    # the checkpoint (written by rank 0) restores rank 0's history on both processes
    _run_two(tmp_path, '--resume')
    for r in range(2):
        resumed = torch.load(tmp_path / f'resumed_rank{r}.pt', weights_only=True)
        for key in ('history_mean', 'history_var_grad', 'history_index'):
            torch.testing.assert_close(resumed[key], ranks[0][key])


def test_norm_switch_under_ddp_hands_over_parameters_and_optimizer_state(tmp_path):
    """BN → CBN at epoch 1 in a 2-process DDP run: same tensors, optimizer state kept, ranks in sync."""
    _run_two(tmp_path, '--switch')
    ranks = [torch.load(tmp_path / f'switch_rank{r}.pt', weights_only=True) for r in range(2)]
    for r in ranks:
        assert r['type'] == 'CrossIterationBatchNorm2d'
        assert r['same_weight'] and r['in_optimizer'] and r['has_momentum']
        assert int(r['state']['history_index'][1]) == 2
    for name, value in ranks[0]['params'].items():  # DDP still averages every gradient
        torch.testing.assert_close(value, ranks[1]['params'][name])
    assert not torch.allclose(ranks[0]['state']['history_mean'], ranks[1]['state']['history_mean'])
