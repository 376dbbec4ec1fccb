"""Python stand-ins for torch's CUDA ``batch_norm_backward_reduce`` / ``_elemt`` (used by SyncBN and by
CBN's CUDA backward), with the kernels' dtype and shape rules, so that CPU tests run that path.

Rules reproduced (aten/src/ATen/native/cuda/Normalization.cu/.cuh):
* statistics (``mean``, ``invstd``, sums) are in the accumulate type: float32 for float16/bfloat16/
  float32 input, float64 for float64;
* ``weight`` must have the input's dtype or the accumulate type (channels-last reduce and elemt), and
  the accumulate type when a reduced-precision input comes with float32 statistics (contiguous elemt);
* contiguous reduce returns undefined (``None``) outputs for the gradients not asked for; the
  channels-last reduce always returns tensors, empty ones when there is no weight.
"""
import torch

_REDUCED = (torch.float16, torch.bfloat16)


def _acc(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _channels_last(*tensors):
    return all(t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)
               and not t.is_contiguous() for t in tensors)


def _check_stats(x, *stats):
    for t in stats:
        if t.dtype != _acc(x):
            raise RuntimeError(f'expected scalar type {_acc(x)} but found {t.dtype} (statistics)')


def _sums(grad_out, x, mean, invstd):
    shape = (1, -1, 1, 1)
    g, xmu = grad_out.double(), x.double() - mean.double().view(shape)
    sum_dy = g.sum((0, 2, 3))
    sum_dy_xmu = (g * xmu).sum((0, 2, 3))
    return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd.double()


def backward_reduce(grad_out, x, mean, invstd, weight, input_g, weight_g, bias_g):
    _check_stats(x, mean, invstd)
    if weight is not None and weight.dtype not in (x.dtype, _acc(x)):
        raise RuntimeError(f'expected weight of dtype {x.dtype} or {_acc(x)}, got {weight.dtype}')
    sum_dy, sum_dy_xmu, grad_w = _sums(grad_out, x, mean, invstd)
    acc = _acc(x)
    if _channels_last(grad_out, x):
        if weight is None:  # "because I cannot return an uninitialized at::Tensor"
            empty = torch.empty(0, dtype=mean.dtype)
            return sum_dy.to(acc), sum_dy_xmu.to(acc), empty, empty.clone()
        return sum_dy.to(acc), sum_dy_xmu.to(acc), grad_w.to(weight.dtype), sum_dy.to(weight.dtype)
    w_dtype = weight.dtype if weight is not None else mean.dtype
    return (sum_dy.to(acc) if input_g else None, sum_dy_xmu.to(acc) if input_g else None,
            grad_w.to(w_dtype) if weight_g else None, sum_dy.to(w_dtype) if bias_g else None)


def backward_elemt(grad_out, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
    _check_stats(x, mean, invstd, sum_dy, sum_dy_xmu)
    if count.dtype != torch.int32:
        raise RuntimeError(f'count must be int32, got {count.dtype}')
    if weight is not None:
        stat = _acc(x) if (x.dtype in _REDUCED and mean.dtype == torch.float32) else x.dtype
        allowed = (x.dtype, _acc(x)) if _channels_last(grad_out, x) else (stat, )
        if weight.dtype not in allowed:
            raise RuntimeError(f'expected weight of dtype {allowed}, got {weight.dtype}')
    shape = (1, -1, 1, 1)
    n = count.double().sum()
    invstd64 = invstd.double().view(shape)
    gamma = 1.0 if weight is None else weight.double().view(shape)
    xmu = x.double() - mean.double().view(shape)
    grad = (grad_out.double() - sum_dy.double().view(shape) / n
            - xmu * invstd64 ** 2 * sum_dy_xmu.double().view(shape) / n) * invstd64 * gamma
    fmt = torch.channels_last if _channels_last(grad_out, x) else torch.contiguous_format
    return grad.to(x.dtype).contiguous(memory_format=fmt)
