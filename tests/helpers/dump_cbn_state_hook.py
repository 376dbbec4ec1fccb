"""Test-only mmengine hook: after training, each rank saves its CBN layers' state dicts."""
import os

import torch
from mmengine.dist import get_rank
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmdet.registry import HOOKS

from cbn_mmdet.models import CrossIterationBatchNorm2d


@HOOKS.register_module()
class DumpCBNStateHook(Hook):
    def after_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        state = {name: {k: v.clone() for k, v in m.state_dict().items()}
                 for name, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}
        torch.save(state, os.path.join(runner.work_dir, f'cbn_state_rank{get_rank()}.pt'))
