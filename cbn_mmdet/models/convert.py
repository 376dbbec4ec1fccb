"""Replace the norm layers of an existing model in place, keeping their tensors."""
from typing import Callable, Sequence, Tuple, Type

import torch.nn as nn

__all__ = ['replace_norm_layers', 'convert_to_cbn']


def replace_norm_layers(root: nn.Module, make_layer: Callable[[nn.Module], nn.Module],
                        from_types: Sequence[Type[nn.Module]]) -> int:
    """Replace every module of exactly one of ``from_types`` under ``root`` by ``make_layer(old)``.

    The new layer takes over the *same* parameter and buffer tensors (γ, β, running statistics,
    ``num_batches_tracked``), so optimizer state, DDP's gradient hooks and checkpoint keys stay valid,
    and keeps the old layer's training flag. ``root`` itself is never replaced. Returns the count.
    """
    from_types = tuple(from_types)
    count = 0
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) not in from_types:
                continue
            new = make_layer(child)
            if child.affine:
                new.weight, new.bias = child.weight, child.bias
            for buf in ('running_mean', 'running_var', 'num_batches_tracked'):
                setattr(new, buf, getattr(child, buf))
            new.train(child.training)
            setattr(parent, name, new)
            count += 1
    return count


def convert_to_cbn(module: nn.Module, window: int = 4,
                   from_types: Tuple[Type[nn.Module], ...] = (nn.BatchNorm2d, ),
                   **options) -> nn.Module:
    """Turn the ``BatchNorm2d`` layers of a plain PyTorch model into CBN layers, in place.

    Each CBN keeps its BN's ``eps``, ``momentum``, ``affine``, ``track_running_stats``, parameters and
    running statistics (the very same tensors) and training flag; ``window`` and ``options`` (any
    other :class:`CrossIterationBatchNorm2d` argument) apply to all of them. Returns ``module``.

    Example:
        >>> model = torchvision.models.resnet50()
        >>> convert_to_cbn(model, window=4)
    """
    from .cbn import CrossIterationBatchNorm2d

    def make(old):
        return CrossIterationBatchNorm2d(old.num_features, eps=old.eps, momentum=old.momentum,
                                         affine=old.affine,
                                         track_running_stats=old.track_running_stats,
                                         window=window, **options)

    replace_norm_layers(module, make, from_types)
    return module
