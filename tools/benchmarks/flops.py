"""torch's ``FlopCounterMode`` with the multiply-adds it does not know: ``addbmm`` (CBN's ∂var/∂θ of
small convs on CPU in the Python path) and CBN's fused CPU ops (the inner products of θ with the
history's gradients and patches: two per channel and past entry, two per channel for the new
entry's references; the small convs' ∂var/∂θ product of ``unfold_gradients``).
Like torch's formulas, one multiply-add is two FLOPs."""
import math

import torch

__all__ = ['counter']


def _addbmm(input_shape, batch1_shape, batch2_shape, *args, out_shape=None, **kwargs) -> int:
    b, m, k = batch1_shape
    return 2 * b * m * k * batch2_shape[2]


def _weight_size(weight_shape) -> int:
    return math.prod(weight_shape)


def _past_window(stats_shape, in_window_shape, weight_shape, *args, out_shape=None,
                 **kwargs) -> int:
    if weight_shape is None:  # not compensated: no products
        return 0
    return 2 * 2 * _weight_size(weight_shape) * stats_shape[1]


def _record_entry(stats_shape, slot, mean_shape, var_shape, count, finite_shape, patch_shape,
                  var_grad_shape, patches_shape, grads_shape, weight_shape, *args, out_shape=None,
                  **kwargs) -> int:
    return 0 if weight_shape is None else 2 * 2 * _weight_size(weight_shape)


def _unfold_gradients(input_shape, x_shape, mean_shape, kh, kw, stride, padding, dilation, groups,
                      *args, out_shape=None, **kwargs) -> int:
    n, c_out, out_h, out_w = x_shape
    return 2 * c_out * (input_shape[1] // groups) * kh * kw * n * out_h * out_w


def counter():
    """A ``FlopCounterMode`` (``get_total_flops()``) that counts CBN's steps with the fused ops:
    the one-call step calls the same kernels from C++, out of the counter's sight, so it is off
    while counting (the same arithmetic)."""
    from torch.utils.flop_counter import FlopCounterMode
    from cbn_mmdet.ops import fused

    class Counter(FlopCounterMode):
        def __enter__(self):
            self._without_one_call = fused.without_one_call()
            self._without_one_call.__enter__()
            return super().__enter__()

        def __exit__(self, *exc):
            try:
                return super().__exit__(*exc)
            finally:
                self._without_one_call.__exit__(None, None, None)

    mapping = {torch.ops.aten.addbmm: _addbmm}
    ops = fused.ops()
    if ops is not None:
        mapping.update({ops.past_window: _past_window, ops.record_entry: _record_entry,
                        ops.unfold_gradients: _unfold_gradients})
    return Counter(display=False, custom_mapping=mapping)
