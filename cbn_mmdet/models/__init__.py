"""Normalization layers (torch only): CBN, SyncCBN, Batch Renormalization, and the converters."""
from . import iteration_clock
from .brn import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .conv_binding import BindStatus, ConvBinding, find_conv_producer
from .convert import convert_to_cbn, replace_norm_layers
from .notices import CBNWarning
from .sync_cbn import SyncCrossIterationBatchNorm2d, convert_to_sync_cbn, gathered_histories

__all__ = ['CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'BatchRenorm2d',
           'CBNWarning', 'BindStatus', 'ConvBinding', 'find_conv_producer', 'iteration_clock', 'convert_to_cbn',
           'convert_to_sync_cbn', 'gathered_histories', 'replace_norm_layers']
