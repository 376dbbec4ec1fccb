"""The model a hook acts on."""
from mmengine.model import is_model_wrapper
from torch import nn

__all__ = ['bare_model']


def bare_model(runner) -> nn.Module:
    """``runner.model`` without its DDP/FSDP wrapper (mmengine's ``is_model_wrapper`` idiom)."""
    return runner.model.module if is_model_wrapper(runner.model) else runner.model
