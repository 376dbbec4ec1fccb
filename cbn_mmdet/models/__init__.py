"""Normalization layers (torch only): CBN, Batch Renormalization, and the BN -> CBN converter."""
from . import iteration_clock
from .brn import BatchRenorm2d
from .cbn import CrossIterationBatchNorm2d
from .conv_binding import BindStatus, ConvBinding, find_conv_producer
from .convert import convert_to_cbn, replace_norm_layers

__all__ = ['CrossIterationBatchNorm2d', 'BatchRenorm2d', 'BindStatus', 'ConvBinding',
           'find_conv_producer', 'iteration_clock', 'convert_to_cbn', 'replace_norm_layers']
