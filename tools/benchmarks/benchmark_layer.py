"""Layer-level cost of CBN: conv + CBN vs conv + BN, forward + backward + optimizer step.

Each row is a conv shape from ResNet-50/101, FPN or the 4conv1fc head, normalised by BN measured in the
same run (medians over repeats after warm-up). Also reports the autograd reference path (the authors'
method: two extra autograd passes) and Naive CBN, and the history memory per layer.

    .venv/bin/python tools/benchmarks/benchmark_layer.py [--repeats 7] [--windows 2 4 8] [--quick]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn

import cbn_mmdet  # noqa: F401
from cbn_mmdet.models import CrossIterationBatchNorm2d

# name, (N, C_in, H, W), C_out, kernel, stride
SHAPES = [
    ('R50 stem 7x7/2', (2, 3, 320, 448), 64, 7, 2),
    ('R50 res2 1x1', (2, 64, 80, 112), 256, 1, 1),
    ('R50 res3 3x3/2', (2, 128, 80, 112), 128, 3, 2),
    ('R50 res4 1x1', (2, 1024, 20, 28), 256, 1, 1),
    ('R50 res5 3x3', (2, 512, 10, 14), 512, 3, 1),
    ('FPN lateral 1x1', (2, 2048, 10, 14), 256, 1, 1),
    ('FPN out 3x3', (2, 256, 80, 112), 256, 3, 1),
    ('4conv1fc 3x3 (512 RoIs)', (512, 256, 7, 7), 256, 3, 1),
]


def time_steps(norm_factory, shape, c_out, kernel, stride, repeats, warmup=2):
    torch.manual_seed(0)
    conv = nn.Conv2d(shape[1], c_out, kernel, stride, kernel // 2, bias=False)
    norm = norm_factory(c_out)
    params = list(conv.parameters()) + list(norm.parameters())
    opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
    x = torch.randn(*shape)
    times = []
    for i in range(warmup + repeats):
        start = time.perf_counter()
        y = norm(conv(x))
        y.square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    history_bytes = sum(t.numel() * t.element_size() for t in getattr(norm, '_history', {}).values())
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    return statistics.median(times), history_bytes / weight_bytes


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--windows', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--quick', action='store_true', help='first 3 shapes, window 4 only')
    parser.add_argument('--threads', type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    shapes = SHAPES[:3] if args.quick else SHAPES
    windows = [4] if args.quick else args.windows
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of '
          f'{args.repeats} steps after 2 warm-up; time ratio to BN in the same run\n')
    header = '| layer | BN ms | ' + ' | '.join(
        f'CBN k={k} | autograd k={k} | naive k={k}' for k in windows) + ' | history / weight (k=max) |'
    print(header)
    print('|' + '---|' * (header.count('|') - 1))
    for name, shape, c_out, kernel, stride in shapes:
        bn, _ = time_steps(nn.BatchNorm2d, shape, c_out, kernel, stride, args.repeats)
        cells = []
        mem = 0.0
        for k in windows:
            cbn, mem = time_steps(lambda c: CrossIterationBatchNorm2d(c, window=k), shape, c_out,
                                  kernel, stride, args.repeats)
            ref, _ = time_steps(lambda c: CrossIterationBatchNorm2d(
                c, window=k, statistics_gradients='autograd'), shape, c_out, kernel, stride,
                args.repeats)
            naive, _ = time_steps(lambda c: CrossIterationBatchNorm2d(c, window=k, compensate=False),
                                  shape, c_out, kernel, stride, args.repeats)
            cells += [f'{cbn / bn:.2f}x', f'{ref / bn:.2f}x', f'{naive / bn:.2f}x']
        print(f'| {name} | {bn * 1e3:.1f} | ' + ' | '.join(cells) + f' | {mem:.2f} |', flush=True)


if __name__ == '__main__':
    main()
