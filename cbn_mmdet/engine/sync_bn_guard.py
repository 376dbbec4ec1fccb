"""Guard against mmengine's ``cfg.sync_bn`` silently replacing CBN layers.

With ``sync_bn='torch'`` (or ``'mmcv'``) in a config, mmengine's ``Runner.wrap_model`` converts *every*
``torch.nn.modules.batchnorm._BatchNorm`` instance to SyncBatchNorm when training is distributed. CBN
is a ``_BatchNorm`` (so that mmdet treats it as BN), so it would vanish without a word and the run would
be SyncBN. Decision: refuse, with a message that says how to get what the user most likely wants.
CBN's statistics are per GPU by design (the paper's setting); a model that mixes SyncBN and CBN names
``SyncBN`` in the ``norm_cfg`` of the parts to synchronise instead of using the global switch.

The guard wraps the name the runner module calls; models without CBN convert exactly as before.
"""
import mmengine.runner.runner as _runner_module
from torch import nn

from ..models.cbn import CrossIterationBatchNorm2d

__all__ = ['SyncBNWithCBNError', 'install']


class SyncBNWithCBNError(RuntimeError):
    """``cfg.sync_bn`` was set for a model that contains CBN layers."""


def _guarded_convert_sync_batchnorm(module: nn.Module, implementation: str = 'torch') -> nn.Module:
    names = [name for name, m in module.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    if names:
        raise SyncBNWithCBNError(
            f"cfg.sync_bn={implementation!r} would replace the model's {len(names)} CBN layers (e.g. "
            f"'{names[0]}') by SyncBatchNorm. CBN keeps per-GPU statistics by design. Remove "
            "`sync_bn` from the config and write norm_cfg=dict(type='SyncBN') in the parts that should "
            "synchronise, or use NormSwitchHook to switch BN layers to SyncBN during training.")
    return _original(module, implementation)


_original = _runner_module.convert_sync_batchnorm


def install() -> None:
    """Make mmengine's runner use the guarded conversion (idempotent)."""
    _runner_module.convert_sync_batchnorm = _guarded_convert_sync_batchnorm
