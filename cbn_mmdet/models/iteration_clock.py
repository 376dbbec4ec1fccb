"""A process-wide training-iteration clock: the number of optimizer steps taken so far.

CBN's history advances once per *iteration*, i.e. once per change of the weights it compensates for.
An iteration is delimited by ``optimizer.step()``: every torch optimizer calls the global post-step hooks,
so a plain PyTorch loop (forward, backward, step) needs nothing else, and mmengine's ``OptimWrapper``
(gradient accumulation included: it steps once per accumulated batch) ticks it exactly when the weights
change. Forwards between two steps belong to the same iteration (shared heads called per FPN level,
accumulated micro-batches, a GradScaler step skipped for inf/NaN gradients).

Each step is pushed to the histories that listen (:func:`watch`), so that a layer's forward reads only
its own state: under ``torch.compile`` a forward that read this counter would be recompiled at every
step.

Loops that update weights without a torch optimizer call :func:`next_iteration` after each update.
"""
import warnings
import weakref

from torch.optim.optimizer import register_optimizer_step_post_hook

from .notices import CBNWarning

__all__ = ['current_iteration', 'next_iteration', 'install', 'watch', 'warn_at_step']

_steps = 0
_listeners: 'weakref.WeakSet' = weakref.WeakSet()
_warnings: list = []


def current_iteration() -> int:
    """Number of optimizer steps (and :func:`next_iteration` calls) seen by this process."""
    return _steps


def next_iteration() -> None:
    """Advance the clock by hand (for training loops that do not use a torch optimizer)."""
    global _steps
    _steps += 1
    for listener in list(_listeners):
        listener.on_iteration()
    while _warnings:
        warnings.warn(_warnings.pop(0), CBNWarning, stacklevel=2)


def warn_at_step(message: str) -> None:
    """Warn at the next step (from code traced by ``torch.compile``, where a warning would break
    the graph)."""
    _warnings.append(message)


def watch(listener) -> None:
    """Call ``listener.on_iteration()`` at every step from now on (held weakly)."""
    _listeners.add(listener)


def _on_optimizer_step(optimizer, args, kwargs) -> None:
    next_iteration()


_handle = None


def install() -> None:
    """Count every torch optimizer's steps (idempotent; ``import cbn_mmdet`` calls it)."""
    global _handle
    if _handle is None:
        _handle = register_optimizer_step_post_hook(_on_optimizer_step)
