"""Gradient-penalty training of SyncCBN on several CPU processes (gloo), for comparison with CBN on the
concatenated batch.

Usage: python sync_cbn_double_backward_worker.py RANK WORLD PORT OUT_FILE
Each step differentiates ``Σ y·v`` with respect to the process's share of the input with
``create_graph=True`` and minimises the squared norm of that gradient (a double backward through
every norm layer), gradients summed over the processes. Step 0 has an empty window, the last one a
full window (3) and no images on rank 0. Runs once on the backward's CPU branch and once with its
CUDA branch selected (stand-in kernels). Writes ``OUT_FILE``: per branch and step the input gradient
of the share and the summed parameter gradients.
"""
import os
import sys

import torch
import torch.distributed as dist

from sync_cbn_worker import WINDOW, TwoLayerNet

#: images per process at each step (uneven; rank 0 empty at the last step)
SIZES = [(2, 2), (3, 1), (0, 4)]


def step_batch(step: int):
    """The step's whole input and output weights ``v``."""
    gen = torch.Generator().manual_seed(200 + step)
    n = sum(SIZES[step])
    x = torch.randn(n, 3, 8, 8, generator=gen, dtype=torch.float64) + 0.2 * step
    v = torch.randn(n, 5, 3, 3, generator=gen, dtype=torch.float64)
    return x, v


def share(tensor, step: int, rank: int):
    start = sum(SIZES[step][:rank])
    return tensor[start:start + SIZES[step][rank]]


def penalty_step(model, opt, x, v, reduce_grads=None):
    """One SGD step on ``‖∂(Σ y·v)/∂x‖²``; returns ``(∂(Σ y·v)/∂x, {name: gradient})``."""
    x = x.clone().requires_grad_(True)
    g, = torch.autograd.grad((model(x) * v).sum(), x, create_graph=True)
    g.square().sum().backward()
    for p in model.parameters():  # (β is not in g: no gradient)
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    if reduce_grads is not None:
        reduce_grads(model)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    opt.zero_grad()
    return g.detach(), grads


def penalty_training(make_norm, rank=None, reduce_grads=None):
    """``len(SIZES)`` penalty steps of :class:`TwoLayerNet`; ``rank``: train on that share."""
    model = TwoLayerNet(make_norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    for step in range(len(SIZES)):
        x, v = step_batch(step)
        if rank is not None:
            x, v = share(x, step, rank), share(v, step, rank)
        steps.append(penalty_step(model, opt, x, v, reduce_grads))
    return steps


def _sum_grads(model):
    for p in model.parameters():
        dist.all_reduce(p.grad)


def main():
    rank, world, port, out_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    dist.init_process_group('gloo', rank=rank, world_size=world)
    import cuda_batch_norm_kernels as standins
    from cbn_mmdet.models.sync_cbn import SyncCrossIterationBatchNorm2d
    from cbn_mmdet.ops import window_norm

    def norm(c):
        return SyncCrossIterationBatchNorm2d(c, window=WINDOW)

    result = dict(cpu=penalty_training(norm, rank, _sum_grads))
    kernels = window_norm.cuda_kernels
    saved = vars(kernels).copy()
    kernels.applies = lambda x: True
    kernels.backward_reduce, kernels.backward_elemt = standins.backward_reduce, standins.backward_elemt
    try:
        result['cuda'] = penalty_training(norm, rank, _sum_grads)
    finally:
        vars(kernels).update(saved)
    torch.save(result, out_file)
    dist.barrier()
    os._exit(0)  # (as sync_cbn_worker: no teardown that could wait for a rank already gone)


if __name__ == '__main__':
    main()
