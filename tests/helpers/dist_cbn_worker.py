"""One process of a 2-process gloo training of a toy model through a real mmengine Runner + DDP.

Usage: python dist_cbn_worker.py RANK WORLD PORT WORK_DIR [--resume] [--sync]
The model starts with BN; NormSwitchHook switches it to CBN(window=3) (``--sync``: SyncCBN) after the
first of two epochs,
SyncBuffersHook averages buffers after each epoch. Writes WORK_DIR/rank{RANK}.pt: the norm's type,
whether it kept BN's weight tensor (in the optimizer, with its momentum state), the parameters and
the CBN state dict (history, running statistics).
--resume: the same runner resumed from the last checkpoint (NormSwitchHook switches before the
checkpoint is loaded); writes WORK_DIR/resumed_rank{RANK}.pt with the loaded CBN state dict.
"""
import os
import sys

import torch
import torch.nn as nn
from mmengine.model import BaseModel
from mmengine.runner import Runner
from torch.utils.data import Dataset

import cbn_mmdet  # noqa: F401
from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN


class ToyData(Dataset):
    def __init__(self, n=16):
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 8, 8, generator=gen) * torch.linspace(0.5, 2, n).view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return dict(inputs=self.x[i])


class ToyModel(BaseModel):
    def __init__(self, norm='CBN'):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.norm = CBN(4, window=3) if norm == 'CBN' else nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 1)

    def forward(self, inputs, data_samples=None, mode='loss'):
        out = self.head(torch.relu(self.norm(self.conv(inputs))).mean((2, 3)))
        return dict(loss=out.square().mean()) if mode == 'loss' else out


def main():
    rank, world, port, work_dir = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    resume = '--resume' in sys.argv
    to = 'SyncCBN' if '--sync' in sys.argv else 'CBN'
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=port)
    torch.manual_seed(0)
    runner = Runner(
        model=ToyModel('BN'), work_dir=work_dir, launcher='pytorch',
        env_cfg=dict(dist_cfg=dict(backend='gloo')),
        train_dataloader=dict(dataset=ToyData(), batch_size=2, num_workers=0,
                              sampler=dict(type='DefaultSampler', shuffle=False),
                              collate_fn=dict(type='default_collate')),
        train_cfg=dict(by_epoch=True, max_epochs=3 if resume else 2),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.05, momentum=0.9)),
        custom_hooks=[dict(type='SyncBuffersHook'),
                      dict(type='NormSwitchHook', switch_epoch=1, to=dict(type=to, window=3))],
        default_hooks=dict(logger=None, checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume, default_scope='mmdet')
    model = runner.model.module
    if resume:
        runner._train_loop = runner.build_train_loop(runner._train_loop)
        runner.optim_wrapper = runner.build_optim_wrapper(runner.optim_wrapper)
        runner.load_or_resume()
        torch.save(dict(type=type(model.norm).__name__,
                        state={k: v.clone() for k, v in model.norm.state_dict().items()}),
                   os.path.join(work_dir, f'resumed_rank{rank}.pt'))
        return
    weight_before = model.norm.weight
    runner.train()
    opt = runner.optim_wrapper.optimizer
    norm = model.norm
    torch.save(dict(
        type=type(norm).__name__, same_weight=norm.weight is weight_before,
        in_optimizer=any(p is norm.weight for g in opt.param_groups for p in g['params']),
        has_momentum='momentum_buffer' in opt.state[norm.weight],
        params={k: v.detach().clone() for k, v in model.named_parameters()},
        state={k: v.clone() for k, v in norm.state_dict().items()}),
        os.path.join(work_dir, f'rank{rank}.pt'))


if __name__ == '__main__':
    main()
    if torch.distributed.is_initialized():  # gloo threads alive at exit can abort the process
        torch.distributed.destroy_process_group()
