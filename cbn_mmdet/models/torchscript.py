"""``torch.jit.script`` refuses the layers with an error that says how to deploy them instead.

``torch.jit.script`` calls ``__prepare_scriptable__`` on every module before compiling anything;
the layers raise there, so the user reads this message rather than a TorchScript error about a
lambda, a ``super()`` call or the conv's forward hook. Why the layers are not made scriptable:
TorchScript compiles both branches of ``forward``, and the training branch (the binding to the
conv through the autograd graph, the history, BRN's schedule) is Python it cannot compile; and the
conv before a CBN layer carries the layer's tap (a forward hook, see
:func:`cbn_mmdet.models.cbn.install_conv_taps`), a stateful Python object that TorchScript cannot
compile as a hook. In evaluation every layer is exactly ``BatchNorm2d`` with its running
statistics, so the ways to deploy are those of the message.
"""
from typing import NoReturn

__all__ = ['refuse_torchscript', 'DEPLOYMENT']

#: How to deploy a model with these layers (also in docs/user_guide/modes.md).
DEPLOYMENT = (
    'torch.export.export(model.eval(), args) or torch.jit.trace(model.eval(), args), which take '
    'the model as it is (in evaluation the layer is BatchNorm2d with its running statistics); or '
    'publish the checkpoint with tools/model_converters/publish_model.py (it drops the CBN '
    "history) and load it with strict=True into the same architecture built with BN "
    "(norm_cfg=dict(type='BN')), which torch.jit.script compiles")


def refuse_torchscript(layer, why: str) -> NoReturn:
    """Raise the error of ``torch.jit.script`` on ``layer`` (``why``: what TorchScript cannot
    compile in it)."""
    raise RuntimeError(f'{layer._get_name()}({layer.num_features}) cannot be compiled by '
                       f'torch.jit.script (TorchScript): {why}. To deploy, use {DEPLOYMENT}.')
