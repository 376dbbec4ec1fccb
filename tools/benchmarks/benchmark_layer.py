"""Layer-level cost of CBN: conv + CBN vs conv + BN, forward + backward + optimizer step.

Rows are conv shapes of ResNet-50/101, FPN and the 4conv1fc head, against BN in the same run; also the
autograd reference, Naive CBN, the approximate modes with their compensation error, and the history
memory per layer. Design: docs/analysis.md. Prints the tables.

    .venv/bin/python tools/benchmarks/benchmark_layer.py [--repeats 7] [--windows 2 4 8] [--quick]
        [--no-accuracy] [--bf16-product [LAYER ...]]
"""
import argparse
import statistics
import time
import warnings

import torch
import torch.nn as nn

import cbn_mmdet  # noqa: F401
from cbn_mmdet.models import CrossIterationBatchNorm2d
import record

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
    history_bytes = norm.history.nbytes() if isinstance(norm, CrossIterationBatchNorm2d) else 0
    del x
    weight_bytes = conv.weight.numel() * conv.weight.element_size()
    return statistics.median(times), history_bytes / weight_bytes


def correction_error(shape, c_out, kernel, stride, steps=6, **options):
    """Mean error of an approximate mode's compensated variance, relative to the exact correction."""
    torch.manual_seed(0)
    n = min(shape[0], 64)  # the head row: 64 RoIs are enough for an estimate and keep this fast
    shape = (n, ) + tuple(shape[1:])
    conv = nn.Conv2d(shape[1], c_out, kernel, stride, kernel // 2, bias=False)
    exact, shadow = CrossIterationBatchNorm2d(c_out, window=4), CrossIterationBatchNorm2d(
        c_out, window=4, **options)
    opt = torch.optim.SGD(conv.parameters(), lr=0.1, momentum=0.9)
    target = None
    for _ in range(steps):
        out = conv(torch.randn(*shape).relu())
        y = exact(out)
        shadow(out)
        target = torch.randn_like(y) if target is None else target
        (y * target).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    ref, got = exact.past_window(), shadow.past_window()
    rows = ref['valid'] > 0
    correction = (ref['var_compensated'] - ref['var'])[rows].abs().mean()
    return float((got['var_compensated'] - ref['var_compensated'])[rows].abs().mean() / correction)


def bf16_product_table(shapes, rounds: int = 3, repeats: int = 3) -> None:
    """CBN with the float32 and with the bfloat16 ∂var/∂θ product against BN, alternating rounds."""
    print('| layer | BN ms | CBN | CBN, bf16 product | bf16 product: error / correction |')
    print('|---|---|---|---|---|')
    variants = {'bn': nn.BatchNorm2d, 'cbn': lambda c: CrossIterationBatchNorm2d(c, window=4),
                'bf16': lambda c: CrossIterationBatchNorm2d(c, window=4, var_grad_dtype='bfloat16')}
    for name, shape, c_out, kernel, stride in shapes:
        times = {v: [] for v in variants}
        for _ in range(rounds):  # alternating: drifts of the machine's speed hit all alike
            for v, factory in variants.items():
                times[v].append(time_steps(factory, shape, c_out, kernel, stride, repeats)[0])
        bn, cbn, bf16 = (statistics.median(times[v]) for v in variants)
        error = correction_error(shape, c_out, kernel, stride, var_grad_dtype='bfloat16')
        print(f'| {name} | {bn * 1e3:.1f} | {cbn / bn:.2f}x | {bf16 / bn:.2f}x | {error:.4f} |',
              flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--repeats', type=int, default=7)
    parser.add_argument('--windows', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--quick', action='store_true', help='first 3 shapes, window 4 only')
    parser.add_argument('--threads', type=int, default=None)
    parser.add_argument('--bf16-product', nargs='*', metavar='LAYER',
                        help='only the float32 vs bfloat16 product table, for the named rows '
                        '(default: all)')
    parser.add_argument('--no-accuracy', action='store_true',
                        help='skip the compensation-error table of the approximate modes')
    record.add_arguments(parser)
    args = parser.parse_args()
    with record.printed() as output:
        run(args)
    record.record(args, output.getvalue(), __file__)


def run(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter('ignore')
    shapes = SHAPES[:3] if args.quick else SHAPES
    if args.bf16_product is not None:
        chosen = [row for row in shapes if not args.bf16_product or row[0] in args.bf16_product]
        return bf16_product_table(chosen)
    windows = [4] if args.quick else args.windows
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, median of '
          f'{args.repeats} steps after 2 warm-up; time ratio to BN in the same run\n')
    header = '| layer | BN ms | ' + ' | '.join(
        f'CBN k={k} | autograd k={k} | naive k={k} | subsampled k={k} | bf16 history k={k} | '
        f'bf16 product k={k}'
        for k in windows) + ' | history / weight (k=max) | bf16 history / weight |'
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
            sub, _ = time_steps(lambda c: CrossIterationBatchNorm2d(
                c, window=k, statistics_gradients='subsampled'), shape, c_out, kernel, stride,
                args.repeats)
            half, mem_half = time_steps(lambda c: CrossIterationBatchNorm2d(
                c, window=k, history_dtype='bfloat16'), shape, c_out, kernel, stride, args.repeats)
            product, _ = time_steps(lambda c: CrossIterationBatchNorm2d(
                c, window=k, var_grad_dtype='bfloat16'), shape, c_out, kernel, stride, args.repeats)
            cells += [f'{t / bn:.2f}x' for t in (cbn, ref, naive, sub, half, product)]
        print(f'| {name} | {bn * 1e3:.1f} | ' + ' | '.join(cells) + f' | {mem:.2f} | {mem_half:.2f} |',
              flush=True)
    if args.no_accuracy:
        return
    print('\nCompensation error of the approximate modes against the exact one (k = 4, random ReLU '
          'inputs, 6 SGD steps): mean |var~_mode - var~_exact| / mean |var~_exact - var_recorded|\n')
    print('| layer | subsampled (every 2nd row/column) | subsampled 3 | bfloat16 history | '
          'bfloat16 product |')
    print('|---|---|---|---|---|')
    for name, shape, c_out, kernel, stride in shapes:
        errors = [correction_error(shape, c_out, kernel, stride, statistics_gradients='subsampled'),
                  correction_error(shape, c_out, kernel, stride, statistics_gradients='subsampled',
                                   subsample=3),
                  correction_error(shape, c_out, kernel, stride, history_dtype='bfloat16'),
                  correction_error(shape, c_out, kernel, stride, var_grad_dtype='bfloat16')]
        print(f'| {name} | ' + ' | '.join(f'{e:.3f}' for e in errors) + ' |', flush=True)


if __name__ == '__main__':
    main()
