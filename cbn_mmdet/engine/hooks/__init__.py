from .cbn_burn_in_hook import CBNBurnInHook, auto_window

__all__ = ['CBNBurnInHook', 'auto_window']
