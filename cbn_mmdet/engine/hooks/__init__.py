from .cbn_burn_in_hook import CBNBurnInHook, auto_window
from .cbn_monitor_hook import CBNMonitorHook
from .norm_switch_hook import NormSwitchHook, switch_norm_layers
from .rng_state_hook import RNGStateHook

__all__ = ['CBNBurnInHook', 'auto_window', 'CBNMonitorHook', 'NormSwitchHook', 'switch_norm_layers',
           'RNGStateHook']
