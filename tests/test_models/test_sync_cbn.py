"""SyncCBN: CBN on the concatenation of all processes' batches (2 CPU processes, gloo)."""
import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT
from sync_cbn_worker import (SAVE_AFTER, SIZES, STEPS, WINDOW, ConcatNet, TwoLayerNet,
                             running_stats, share, step_batch, train_step)

from cbn_mmdet.models import CrossIterationBatchNorm2d
from cbn_mmdet.models.sync_cbn import SyncCrossIterationBatchNorm2d

WORKER = os.path.join(REPO_ROOT, 'tests', 'helpers', 'sync_cbn_worker.py')
TOL = dict(rtol=1e-9, atol=1e-11)


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope='module')
def two_processes(tmp_path_factory):
    out = tmp_path_factory.mktemp('sync_cbn')
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS='1')
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), '2', port, str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    return [torch.load(out / f'rank{r}.pt', weights_only=True) for r in range(2)]


@pytest.fixture(scope='module')
def whole_batch():
    """CBN on one process with each step's whole batch."""
    model = TwoLayerNet(lambda c: CrossIterationBatchNorm2d(c, window=WINDOW))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    outputs, stats = [], []
    for step in range(STEPS):
        x, weights = step_batch(step)
        outputs.append(train_step(model, opt, x, weights))
        stats.append(running_stats(model))
    return dict(outputs=outputs, stats=stats,
                params={k: v.detach() for k, v in model.named_parameters()})


def test_two_processes_equal_cbn_on_the_whole_batch(two_processes, whole_batch):
    """Outputs at every step, running statistics on both processes (bitwise the same on both) and
    the parameters after 6 SGD steps (window 3, so compensated past entries from step 2 on) equal CBN
    on the concatenated batch, with uneven shares and each process empty at one step."""
    for step in range(STEPS):
        for rank, result in enumerate(two_processes):
            torch.testing.assert_close(result['outputs'][step],
                                       share(whole_batch['outputs'][step], step, rank), **TOL)
            for key, value in whole_batch['stats'][step].items():
                torch.testing.assert_close(result['stats'][step][key], value, **TOL)
        # every process pools the same gathered moments in the same order: the same bits
        for key, value in two_processes[0]['stats'][step].items():
            assert torch.equal(two_processes[1]['stats'][step][key], value), (step, key)
    for rank, result in enumerate(two_processes):
        for name, value in whole_batch['params'].items():
            torch.testing.assert_close(result['params'][name], value, **TOL)
        # each process keeps the entries of its own batches, one per iteration, in step
        assert result['entries'] == [WINDOW - 1] * 2


def test_cuda_branch_of_the_backward_all_reduces_like_the_cpu_branch(two_processes, whole_batch):
    """The backward's CUDA branch (SyncBN's kernels, Python stand-ins with their dtype rules) with
    a process group: outputs and parameters after 6 steps equal CBN on the whole batch."""
    for rank, result in enumerate(two_processes):
        for step in range(STEPS):
            torch.testing.assert_close(result['cuda_branch']['outputs'][step],
                                       share(whole_batch['outputs'][step], step, rank), **TOL)
        for name, value in whole_batch['params'].items():
            torch.testing.assert_close(result['cuda_branch']['params'][name], value, **TOL)


def test_gathered_checkpoint_from_rank0_resumes_every_process_exactly(two_processes):
    for result in two_processes:
        resumed = result['resumed']['gathered']
        assert resumed['warnings'] == [] and resumed['filled'] == [WINDOW - 1] * 2
        for step, output in zip(range(SAVE_AFTER, STEPS), resumed['outputs']):
            assert torch.equal(output, result['outputs'][step]), step


def test_checkpoint_of_one_process_history_restarts_the_window_loudly(two_processes):
    for result in two_processes:
        resumed = result['resumed']['plain']
        assert resumed['filled'] == [0, 0]
        assert any("one process's history of a 2-process run" in w for w in resumed['warnings'])


def test_concatenated_input_equals_cbn_on_the_whole_batch(two_processes):
    """concat='compensate': each process compensates its own past entries slice by slice; pooled,
    the outputs equal CBN's on the whole batch."""
    model = ConcatNet(lambda c: CrossIterationBatchNorm2d(c, window=WINDOW, concat='compensate'))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(STEPS):
        x, weights = step_batch(step)
        whole = train_step(model, opt, x, weights)
        for rank, result in enumerate(two_processes):
            torch.testing.assert_close(result['concat']['outputs'][step], share(whole, step, rank),
                                       **TOL)
    assert model.norm.last_bind_status == 'concat'


def test_gathered_checkpoint_keeps_every_process_slice_histories(two_processes):
    """The per-slice histories of a concatenated input are gathered with the ring: rank 0's
    checkpoint resumes every process exactly, with no warning."""
    keys = two_processes[0]['concat']['keys']
    for rank in range(2):
        assert f'norm.rank{rank}_history_slices' in keys
        assert f'norm.rank{rank}_slice1_history_var_grad' in keys
    for result in two_processes:
        concat = result['concat']
        assert concat['warnings'] == []
        for step, output in zip(range(SAVE_AFTER, STEPS), concat['resumed']):
            assert torch.equal(output, concat['outputs'][step]), step


@pytest.mark.parametrize('net,options', [(TwoLayerNet, {}), (ConcatNet, dict(concat='compensate'))],
                         ids=['plain', 'concat'])
def test_one_process_checkpoint_resumes_the_processes_as_one_window(two_processes, net, options):
    """A checkpoint of CBN on one process (no process count saved) loaded into SyncCBN on two:
    rank 0 keeps the saved entries, the other ranks the same iterations without values (the
    per-slice histories of a concatenation included), so the pooled window is the saved one and
    the outputs and the running statistics (unbiased with the window's count) equal one process's
    CBN continuing on the whole batch, with no warning."""
    model = net(lambda c: CrossIterationBatchNorm2d(c, window=WINDOW, **options))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    whole = [train_step(model, opt, *step_batch(step)) for step in range(STEPS)]
    for rank, result in enumerate(two_processes):
        resumed = result['from_one_process']['plain' if net is TwoLayerNet else 'concat']
        assert resumed['warnings'] == []
        for step, output in zip(range(SAVE_AFTER, STEPS), resumed['outputs']):
            torch.testing.assert_close(output, share(whole[step], step, rank), **TOL)
        for name, value in running_stats(model).items():
            torch.testing.assert_close(resumed['stats'][name], value, **TOL)


@pytest.mark.parametrize('reentrant', [False, True])
def test_activation_checkpointing_trains_the_same(two_processes, reentrant):
    """Under a checkpoint the first pass and the recomputation both pool across the processes
    (the same collectives on every process); the state is updated once."""
    for result in two_processes:
        for step in range(STEPS):
            torch.testing.assert_close(result['checkpointed'][reentrant][step],
                                       result['outputs'][step], **TOL)


def test_one_process_is_cbn_and_says_so():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3).double()
    sync, plain = (cls(4, window=3).double() for cls in (SyncCrossIterationBatchNorm2d,
                                                         CrossIterationBatchNorm2d))
    opt = torch.optim.SGD(conv.parameters(), lr=0.1)
    with pytest.warns(UserWarning, match='outside a distributed run'):
        for _ in range(4):
            x = conv(torch.randn(2, 3, 6, 6, dtype=torch.float64))
            y = sync(x)
            assert torch.equal(y, plain(x))
            y.sum().backward()
            opt.step()
            opt.zero_grad()


def test_sizes_cover_uneven_and_empty_shares():
    assert any(a != b for a, b in SIZES) and any(0 in s for s in SIZES)
    assert {s.index(0) for s in SIZES if 0 in s} == {0, 1}


def test_gathered_history_keys_count_as_history():
    """publish_model.py and tools/test.py drop what ``is_history_state_key`` names."""
    from cbn_mmdet.models.cbn import is_history_state_key
    for key in ('neck.bn.rank1_history_var_grad', 'neck.bn.rank0_call2_history_mean',
                'neck.bn.history_processes', 'neck.bn.rank1_slice0_history_var_grad',
                'neck.bn.rank0_history_slices'):
        assert is_history_state_key(key), key
    for key in ('neck.bn.rank1_running_mean', 'neck.bn.weight', 'neck.rank0_conv.weight'):
        assert not is_history_state_key(key), key


def test_bad_options_are_named_as_sync_cbn_with_process_group_allowed():
    with pytest.raises(TypeError, match=r"SyncCBN got unknown option\(s\) \['windw'\].*process_group"):
        SyncCrossIterationBatchNorm2d(4, windw=4)
    with pytest.raises(ValueError, match='SyncCBN window must be a positive int'):
        SyncCrossIterationBatchNorm2d(4, window=0)
    with pytest.raises(ValueError, match='SyncCBN fallback'):
        SyncCrossIterationBatchNorm2d(4, fallback='gn')
    with pytest.raises(ValueError, match=r'SyncCBN active_window must be in \[1, window=4\]'):
        SyncCrossIterationBatchNorm2d(4, window=4).active_window = 5
    with pytest.raises(TypeError, match=r"CBN got unknown option\(s\) \['process_group'\]"):
        CrossIterationBatchNorm2d(4, process_group=None)  # only SyncCBN takes it
