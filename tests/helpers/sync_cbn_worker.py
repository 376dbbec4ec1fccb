"""SyncCBN on several CPU processes (gloo) against CBN on the concatenated batch, and their shared setup.

Usage: python sync_cbn_worker.py RANK WORLD PORT OUT_DIR
Trains :class:`TwoLayerNet` with SyncCBN for ``STEPS`` SGD steps, each process on its share
(``SIZES[step][rank]`` images, possibly none) of the step's batch, gradients summed over the
processes; after ``SAVE_AFTER`` steps saves rank 0's checkpoint with ``gathered_histories`` (and one
without), then resumes a fresh model from each and repeats the remaining steps. Writes
``OUT_DIR/rank{RANK}.pt``: per step the output of its share and the running statistics; the final
parameters; the outputs of the resumed runs; the warnings of the run without gathering; the outputs
of the same training under activation checkpointing (reentrant and not), and with the backward's
CUDA branch run by stand-in kernels. The same training and gathered resume for :class:`ConcatNet`
(a norm over a concatenation, ``concat='compensate'``). Both nets resumed from a one-process CBN
checkpoint.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import cbn_mmdet  # noqa: F401

STEPS, SAVE_AFTER, WINDOW = 6, 3, 3
#: images per process at each step (uneven, and each process empty once)
SIZES = [(2, 2), (3, 1), (4, 0), (1, 3), (0, 4), (2, 2)]


class TwoLayerNet(nn.Module):
    """conv → norm → ReLU → conv (stride 2, with bias) → norm, float64."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv2d(3, 6, 3, padding=1, bias=False)
        self.norm1 = norm(6)
        self.conv2 = nn.Conv2d(6, 5, 3, stride=2)
        self.norm2 = norm(5)
        self.double()

    def forward(self, x):
        return self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x)))))


class ConcatNet(nn.Module):
    """Two convs (one with bias) concatenated, then one norm: the norm's input is a concatenation,
    each slice compensated with its own conv under ``concat='compensate'``; the output shaped like
    :class:`TwoLayerNet`'s."""

    def __init__(self, norm):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 3, 3, stride=2, bias=False)
        self.b = nn.Conv2d(3, 2, 3, stride=2)
        self.norm = norm(5)
        self.double()

    def forward(self, x):
        return self.norm(torch.cat([self.a(x), self.b(x)], 1))


class CheckpointedNet(TwoLayerNet):
    """The same under activation checkpointing (reentrant like mmdet's ``with_cp``, or not)."""

    def __init__(self, norm, reentrant: bool):
        super().__init__(norm)
        self.reentrant = reentrant

    def forward(self, x):
        if self.reentrant:
            x = x.detach().requires_grad_()  # a reentrant checkpoint needs an input with grad
        return torch.utils.checkpoint.checkpoint(super().forward, x, use_reentrant=self.reentrant)


def step_batch(step: int):
    """The step's whole batch and loss weights (statistics drift over the steps)."""
    gen = torch.Generator().manual_seed(100 + step)
    n = sum(SIZES[step])
    x = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64)
    x = x * torch.linspace(0.5, 2.0, 3, dtype=torch.float64).view(1, 3, 1, 1) + 0.3 * step
    weights = torch.randn(n, 5, 3, 3, generator=gen, dtype=torch.float64)
    return x, weights


def share(tensor, step: int, rank: int):
    start = sum(SIZES[step][:rank])
    return tensor[start:start + SIZES[step][rank]]


def train_step(model, opt, x, weights, reduce_grads=None):
    """One SGD step on ``Σ y·weights``; returns the output."""
    y = model(x)
    (y * weights).sum().backward()
    if reduce_grads is not None:
        reduce_grads(model)
    opt.step()
    opt.zero_grad()
    return y.detach()


def running_stats(model):
    return {k: v.clone() for k, v in model.state_dict().items() if k.endswith(('running_mean',
                                                                              'running_var'))}


def _sum_grads(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)


def _train_with_cuda_kernel_standins(make, rank):
    """The same training with the backward's CUDA branch (SyncBN's kernels, here their Python
    stand-ins): its all-reduce of the two sums is then the one that makes the gradients global."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import cuda_batch_norm_kernels as standins
    from cbn_mmdet.ops import window_norm

    kernels = window_norm.cuda_kernels
    saved = vars(kernels).copy()
    kernels.applies = lambda x: True
    kernels.backward_reduce, kernels.backward_elemt = standins.backward_reduce, standins.backward_elemt
    try:
        model, opt = make()
        outputs = [train_step(model, opt, share(x, step, rank), share(weights, step, rank),
                              _sum_grads)
                   for step, (x, weights) in ((step, step_batch(step)) for step in range(STEPS))]
    finally:
        vars(kernels).update(saved)
    return dict(outputs=outputs, params={k: v.detach().clone() for k, v in model.named_parameters()})


def _train_and_resume(make, rank, ckpt):
    """Train ``STEPS`` steps, save rank 0's gathered checkpoint after ``SAVE_AFTER``, resume a fresh
    model from it for the remaining steps: the outputs of both, the warnings of the resume."""
    from cbn_mmdet.models.sync_cbn import gathered_histories
    model, opt = make()
    outputs = []
    for step in range(STEPS):
        x, weights = step_batch(step)
        outputs.append(train_step(model, opt, share(x, step, rank), share(weights, step, rank),
                                  _sum_grads))
        if step + 1 == SAVE_AFTER:
            with gathered_histories(model):
                state = model.state_dict()
            if rank == 0:
                torch.save(state, ckpt)
            dist.barrier()
    fresh, fresh_opt = make()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        fresh.load_state_dict(torch.load(ckpt, weights_only=True))
    resumed = [train_step(fresh, fresh_opt, share(x, step, rank), share(weights, step, rank),
                          _sum_grads)
               for step, (x, weights) in ((step, step_batch(step))
                                          for step in range(SAVE_AFTER, STEPS))]
    return dict(outputs=outputs, resumed=resumed, warnings=[str(w.message) for w in caught],
                keys=sorted(torch.load(ckpt, weights_only=True)) if rank == 0 else None)


def _resume_from_one_process(make_sync, make_one, rank):
    """A one-process CBN checkpoint (the whole batch for ``SAVE_AFTER`` steps, trained here on every
    rank alike) loaded into SyncCBN, then the remaining steps on the shares: the outputs and the
    warnings of the load."""
    one, one_opt = make_one()
    for step in range(SAVE_AFTER):
        train_step(one, one_opt, *step_batch(step))
    model, opt = make_sync()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        model.load_state_dict(one.state_dict())
    outputs = [train_step(model, opt, share(x, step, rank), share(weights, step, rank), _sum_grads)
               for step, (x, weights) in ((step, step_batch(step)) for step in range(SAVE_AFTER, STEPS))]
    return dict(outputs=outputs, warnings=[str(w.message) for w in caught],
                stats=running_stats(model))


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    from cbn_mmdet.models.sync_cbn import SyncCrossIterationBatchNorm2d, gathered_histories

    def make(checkpointed=None):
        def norm(c):
            return SyncCrossIterationBatchNorm2d(c, window=WINDOW)
        model = TwoLayerNet(norm) if checkpointed is None else CheckpointedNet(norm, checkpointed)
        return model, torch.optim.SGD(model.parameters(), lr=0.05)

    model, opt = make()
    outputs, stats = [], []
    ckpt = os.path.join(out_dir, 'gathered.pth')
    plain = os.path.join(out_dir, 'plain.pth')
    for step in range(STEPS):
        x, weights = step_batch(step)
        outputs.append(train_step(model, opt, share(x, step, rank), share(weights, step, rank),
                                  _sum_grads))
        stats.append(running_stats(model))
        if step + 1 == SAVE_AFTER:
            with gathered_histories(model):
                state = model.state_dict()
            if rank == 0:
                torch.save(state, ckpt)
                torch.save(model.state_dict(), plain)
            dist.barrier()
    resumed = {}
    for name, path in (('gathered', ckpt), ('plain', plain)):
        fresh, fresh_opt = make()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            fresh.load_state_dict(torch.load(path, weights_only=True))
        resumed[name] = dict(warnings=[str(w.message) for w in caught], filled=[
            fresh.norm1.history.filled, fresh.norm2.history.filled], outputs=[])
        for step in range(SAVE_AFTER, STEPS):
            x, weights = step_batch(step)
            resumed[name]['outputs'].append(train_step(
                fresh, fresh_opt, share(x, step, rank), share(weights, step, rank), _sum_grads))
    checkpointed = {}
    for reentrant in (False, True):
        cp_model, cp_opt = make(reentrant)
        checkpointed[reentrant] = [
            train_step(cp_model, cp_opt, share(x, step, rank), share(weights, step, rank),
                       _sum_grads)
            for step, (x, weights) in ((step, step_batch(step)) for step in range(STEPS))]
    cuda_branch = _train_with_cuda_kernel_standins(make, rank)

    def maker(norm, net, **options):
        """A factory of ``net`` with ``norm(c, window=WINDOW, **options)`` and its SGD."""
        def make():
            model = net(lambda c: norm(c, window=WINDOW, **options))
            return model, torch.optim.SGD(model.parameters(), lr=0.05)
        return make

    sync_cbn, cbn = SyncCrossIterationBatchNorm2d, CrossIterationBatchNorm2d
    concat = _train_and_resume(maker(sync_cbn, ConcatNet, concat='compensate'), rank,
                               os.path.join(out_dir, 'concat.pth'))
    from_one_process = {
        'plain': _resume_from_one_process(maker(sync_cbn, TwoLayerNet), maker(cbn, TwoLayerNet),
                                          rank),
        'concat': _resume_from_one_process(maker(sync_cbn, ConcatNet, concat='compensate'),
                                           maker(cbn, ConcatNet, concat='compensate'), rank)}
    torch.save(dict(outputs=outputs, stats=stats, resumed=resumed, checkpointed=checkpointed,
                    cuda_branch=cuda_branch, concat=concat, from_one_process=from_one_process,
                    params={k: v.detach().clone() for k, v in model.named_parameters()},
                    entries=[len(m.history.entries()) for m in (model.norm1, model.norm2)]),
               os.path.join(out_dir, f'rank{rank}.pt'))
    dist.barrier()
    # no destroy_process_group: the rank hosting the store may leave first and a late rank's teardown
    # would wait for it
    os._exit(0)


if __name__ == '__main__':
    main()
