"""Per-layer fixed cost of CBN: many tiny conv + norm + ReLU layers, where only bookkeeping is left.

For BN, Naive CBN and CBN: training-step time per layer, time above BN, and tensor operations per layer
and step (for CBN also by part of the layer). Design: docs/analysis.md. Prints the table; ``--out`` also writes it as JSON.
``--baseline DIR`` also times the layer of another checkout of this project (e.g. made with
``git worktree add /tmp/baseline REV``) in the same round-robin, as ``naive-baseline`` and
``cbn-baseline``: a change's effect without the machine's drift between two runs.

    .venv/bin/python tools/benchmarks/benchmark_fixed_cost.py [--layers 20] [--channels 16]
        [--size 8] [--batch 2] [--steps 200] [--warmup 20] [--threads 1] [--baseline DIR]
        [--out FILE.json]
"""
import argparse
import contextlib
import functools
import importlib
import json
import os.path as osp
import statistics
import sys
import time
import types
from collections import Counter

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, __file__.rsplit('/tools/', 1)[0])
from cbn_mmdet.models import CrossIterationBatchNorm2d, cbn, window_history  # noqa: E402

VARIANTS = {
    'bn': lambda c: nn.BatchNorm2d(c),
    'naive': lambda c: CrossIterationBatchNorm2d(c, window=4, compensate=False),
    'cbn': lambda c: CrossIterationBatchNorm2d(c, window=4),
}


def build(norm, layers, channels):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), norm(channels), nn.ReLU()]
    return nn.Sequential(*mods)


def baseline_variants(root: str) -> dict:
    """Naive CBN and CBN of the checkout at ``root``, imported beside this one as the package
    ``cbn_mmdet_baseline`` (its torch-only ``models``; the OpenMMLab registrations that its top
    package makes on import would clash with this one's, so they are not run)."""
    name = 'cbn_mmdet_baseline'
    if not osp.isfile(osp.join(root, 'cbn_mmdet', 'models', 'cbn.py')):
        raise SystemExit(f'--baseline {root!r}: not a checkout of this project (no '
                         'cbn_mmdet/models/cbn.py under it); make one with git worktree add DIR REV')
    package = types.ModuleType(name)
    package.__path__ = [osp.join(osp.abspath(root), 'cbn_mmdet')]
    sys.modules[name] = package
    models = importlib.import_module(name + '.models')
    models.iteration_clock.install()  # its own iteration clock, ticked by the same optimizers
    layer = models.CrossIterationBatchNorm2d
    return {'naive-baseline': lambda c: layer(c, window=4, compensate=False),
            'cbn-baseline': lambda c: layer(c, window=4)}


class OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


#: the parts of a CBN training step counted separately: (owner, attribute, label)
PHASES = [(window_history.WindowHistory, 'past', 'past window (compensation)'),
          (window_history.WindowHistory, 'record', 'record (incl. statistic gradients)'),
          (cbn, 'conv_statistic_gradients', 'statistic gradients'),
          (cbn, 'window_moments', 'window moments'),
          (cbn.CrossIterationBatchNorm2d, '_update_running_stats', 'running statistics'),
          (cbn, 'all_finite', 'finiteness of the batch moments'),
          (cbn, 'batch_moments', 'batch moments')]


@contextlib.contextmanager
def counting_phases(totals: Counter):
    """Count the tensor operations inside each of :data:`PHASES` into ``totals``."""
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in PHASES]

    def counted(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counter = OpCounter()
            with counter:
                result = fn(*args, **kwargs)
            totals[label] += sum(counter.ops.values())
            return result
        return wrapper

    for (owner, name, fn), (_, _, label) in zip(originals, PHASES):
        setattr(owner, name, counted(fn, label))
    try:
        yield
    finally:
        for owner, name, fn in originals:
            setattr(owner, name, fn)


def step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def run(args):
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.channels, args.size, args.size)
    variants = dict(VARIANTS, **(baseline_variants(args.baseline) if args.baseline else {}))
    setups = {}
    for name, norm in variants.items():
        model = build(norm, args.layers, args.channels)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(args.warmup):
            step(model, opt, x)
        setups[name] = (model, opt)
    times = {name: [] for name in variants}
    for _ in range(args.steps):  # round-robin
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            step(model, opt, x)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, (model, opt) in setups.items():
        counter = OpCounter()
        with counter:
            step(model, opt, x)
        rows[name] = dict(step_ms=1e3 * statistics.median(times[name]),
                          ops=sum(counter.ops.values()), top_ops=counter.ops.most_common(8))
    phases = Counter()
    model, opt = setups['cbn']
    with counting_phases(phases):
        step(model, opt, x)
    rows['cbn']['phase_ops'] = {label: n / args.layers for label, n in phases.items()}
    base = rows['bn']
    lines = [f'{args.layers} layers of conv {args.channels}->{args.channels} 3x3 + norm + ReLU, input '
             f'{args.batch}x{args.channels}x{args.size}x{args.size}, {args.threads} thread(s), '
             f'median of {args.steps} interleaved steps', '',
             '| variant | step ms | ms per layer | above BN, ms per layer | ops per layer and step |',
             '|---|---|---|---|---|']
    for name, r in rows.items():
        per_layer = r['step_ms'] / args.layers
        above = (r['step_ms'] - base['step_ms']) / args.layers
        lines.append(f"| {name} | {r['step_ms']:.2f} | {per_layer:.3f} | {above:.3f} | "
                     f"{r['ops'] / args.layers:.0f} |")
    print('\n'.join(lines))
    for name, r in rows.items():
        print(f"{name}: most frequent ops per step: {r['top_ops']}")
    print('cbn: ops per layer and step by part (nested parts also count in the outer one): ' +
          ', '.join(f'{label} {n:.0f}' for label, n in rows['cbn']['phase_ops'].items()))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    return rows


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--layers', type=int, default=20)
    parser.add_argument('--channels', type=int, default=16)
    parser.add_argument('--size', type=int, default=8)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--steps', type=int, default=200)
    parser.add_argument('--warmup', type=int, default=20)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--baseline', metavar='DIR',
                        help='root of another checkout whose CBN is timed in the same round-robin')
    parser.add_argument('--out')
    return parser.parse_args(argv)


if __name__ == '__main__':
    run(parse_args())
