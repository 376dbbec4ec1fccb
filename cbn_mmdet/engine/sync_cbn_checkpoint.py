"""mmengine's checkpoints hold every process's SyncCBN history.

A SyncCBN layer keeps the history of its own process's batches; rank 0's checkpoint alone would
resume every process with rank 0's. mmengine calls ``Runner.save_checkpoint`` on every process (it
writes on rank 0 only), so wrapping it in :func:`~cbn_mmdet.models.sync_cbn.gathered_histories`
gathers the histories there, once per checkpoint. Models without SyncCBN save exactly as before.
"""
from mmengine.runner import Runner

from ..models.sync_cbn import gathered_histories
from .hooks.runner_model import bare_model

__all__ = ['install']


def _save_checkpoint_with_every_history(self, *args, **kwargs):
    with gathered_histories(bare_model(self)):
        return _original(self, *args, **kwargs)


_original = Runner.save_checkpoint


def install() -> None:
    """Make ``Runner.save_checkpoint`` gather SyncCBN histories (idempotent)."""
    Runner.save_checkpoint = _save_checkpoint_with_every_history
