"""Training-time machinery: hooks that push settings into CBN layers, and runner guards."""
from . import sync_bn_guard, sync_cbn_checkpoint
from .hooks import *  # noqa: F401,F403
