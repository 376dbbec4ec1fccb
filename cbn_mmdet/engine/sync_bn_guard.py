"""mmengine's ``cfg.sync_bn`` for models with CBN: refused for SyncBN, or ``'SyncCBN'``.

With ``sync_bn='torch'`` (or ``'mmcv'``) in a config, mmengine's ``Runner.wrap_model`` converts *every*
``torch.nn.modules.batchnorm._BatchNorm`` instance to SyncBatchNorm when training is distributed. CBN
is a ``_BatchNorm`` (so that mmdet treats it as BN), so it would vanish without a word and the run would
be SyncBN. Decision: refuse, with a message that says how to get what the user most likely wants.
CBN's statistics are per GPU by design (the paper's setting); a model that mixes SyncBN and CBN names
``SyncBN`` in the ``norm_cfg`` of the parts to synchronise instead of using the global switch.

``sync_bn='SyncCBN'`` (opt-in) synchronises everything: CBN layers become SyncCBN (statistics across
processes and iterations), ``BatchNorm1d/2d/3d`` torch's SyncBatchNorm; any other batch-norm layer
(e.g. BRN) is refused, since it has no synchronised form.

The guard wraps the name the runner module calls; models without CBN convert exactly as before.
"""
import mmengine.runner.runner as _runner_module
from torch import nn

from torch.nn.modules.batchnorm import _BatchNorm

from ..models.cbn import CrossIterationBatchNorm2d
from ..models.convert import replace_norm_layers
from ..models.sync_cbn import SyncCrossIterationBatchNorm2d, convert_to_sync_cbn

__all__ = ['SyncBNWithCBNError', 'install', 'SYNC_CBN']

#: the ``cfg.sync_bn`` value that converts CBN layers to SyncCBN
SYNC_CBN = 'SyncCBN'


class SyncBNWithCBNError(RuntimeError):
    """``cfg.sync_bn`` was set for a model that contains CBN layers."""


def _guarded_convert_sync_batchnorm(module: nn.Module, implementation: str = 'torch') -> nn.Module:
    if implementation == SYNC_CBN:
        return _convert_to_sync_cbn(module)
    names = [name for name, m in module.named_modules() if isinstance(m, CrossIterationBatchNorm2d)]
    if names:
        raise SyncBNWithCBNError(
            f"cfg.sync_bn={implementation!r} would replace the model's {len(names)} CBN layers (e.g. "
            f"'{names[0]}') by SyncBatchNorm. CBN keeps per-GPU statistics by design. Remove "
            "`sync_bn` from the config and write norm_cfg=dict(type='SyncBN') in the parts that should "
            "synchronise, or use NormSwitchHook to switch BN layers to SyncBN during training; or "
            f"set sync_bn={SYNC_CBN!r} to make the CBN layers SyncCBN (statistics across GPUs and "
            "iterations) and the BN layers SyncBatchNorm.")
    return _original(module, implementation)


def _convert_to_sync_cbn(module: nn.Module) -> nn.Module:
    convert_to_sync_cbn(module)
    replace_norm_layers(module, nn.SyncBatchNorm.convert_sync_batchnorm,
                        (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d))
    left = [(name, type(m).__name__) for name, m in module.named_modules()
            if isinstance(m, _BatchNorm) and not isinstance(m, (SyncCrossIterationBatchNorm2d,
                                                                nn.SyncBatchNorm))]
    if left:
        raise SyncBNWithCBNError(
            f'cfg.sync_bn={SYNC_CBN!r} makes CBN layers SyncCBN and BatchNorm1d/2d/3d SyncBatchNorm; '
            f'{len(left)} other batch-norm layers have no synchronised form (e.g. {left[0][0]!r}, '
            f'a {left[0][1]}). Remove `sync_bn` or use norm_cfg per part.')
    return module


_original = _runner_module.convert_sync_batchnorm


def install() -> None:
    """Make mmengine's runner use the guarded conversion (idempotent)."""
    _runner_module.convert_sync_batchnorm = _guarded_convert_sync_batchnorm
