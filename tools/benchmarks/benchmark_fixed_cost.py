"""Per-layer fixed cost of CBN: many tiny conv + norm + ReLU layers, where only bookkeeping is left.

For BN, Naive CBN and CBN: training-step time per layer, time above BN, and tensor operations per layer
and step (for CBN also by part of the layer). ``--time-parts`` also times the parts of the layers, BN's
forward as one part (in extra steps after the round-robin, each part's calls timed by a wrapper).
Design: docs/analysis.md. Prints the table; ``--out`` also writes it as JSON.
``--baseline DIR`` also times the layer of another checkout of this project (e.g. made with
``git worktree add /tmp/baseline REV``) in the same round-robin, as ``naive-baseline`` and
``cbn-baseline``: a change's effect without the machine's drift between two runs.

    .venv/bin/python tools/benchmarks/benchmark_fixed_cost.py [--layers 20] [--channels 16]
        [--size 8] [--batch 2] [--steps 200] [--warmup 20] [--threads 1] [--baseline DIR]
        [--time-parts] [--python-path] [--device cpu|cuda] [--compile BACKEND]
        [--trace-ops VARIANT] [--out FILE.json]

On CUDA every step ends with a synchronisation (the step time is then launch-bound: what each
operation costs the host), and ``--time-parts`` times the host's side of each part.
"""
import argparse
import contextlib
import functools
import importlib
import inspect
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
from cbn_mmdet.models import CrossIterationBatchNorm2d, cbn, conv_binding, window_history  # noqa: E402
from cbn_mmdet.ops import fused, window_norm  # noqa: E402
import record  # noqa: E402

VARIANTS = {
    'bn': lambda c: nn.BatchNorm2d(c),
    'naive': lambda c: CrossIterationBatchNorm2d(c, window=4, compensate=False),
    'cbn': lambda c: CrossIterationBatchNorm2d(c, window=4),
}


#: with ``--python-path``: the variants again with the fused CPU ops off (the path CUDA and
#: torch.compile take), and with the fused ops but without the one-call step (the Python forward
#: calling them one by one, as before the one-call step)
PYTHON_PATH = {'naive-python': VARIANTS['naive'], 'cbn-python': VARIANTS['cbn']}
FUSED_FORWARD = {'naive-fused': VARIANTS['naive'], 'cbn-fused': VARIANTS['cbn']}


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


_PACKAGE = osp.join(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))), 'cbn_mmdet', '')


class OpTracer(TorchDispatchMode):
    """Each dispatched operation with the line of this package that issued it (``-``: torch's own,
    e.g. autograd, the conv, the optimizer), counted in order of first appearance."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        frame, where = sys._getframe(1), '-'
        while frame is not None:
            if frame.f_code.co_filename.startswith(_PACKAGE):
                where = (f'{frame.f_code.co_filename[len(_PACKAGE):]}:{frame.f_lineno} '
                         f'{frame.f_code.co_name}')
                break
            frame = frame.f_back
        self.ops[(str(func.overloadpacket), where)] += 1
        return func(*args, **(kwargs or {}))


def trace_ops(name, model, opt, x, layers: int) -> list:
    """``(operations per layer, op, source line)`` of one training step of variant ``name``."""
    tracer = OpTracer()
    with tracer:
        variant_step(name, model, opt, x)
    return [(n / layers, op, where) for (op, where), n in tracer.ops.items()]


#: the parts of a CBN training step counted separately: (owner, attribute, label)
PHASES = [(window_history.WindowHistory, 'past', 'past window (compensation)'),
          (window_history.WindowHistory, 'record', 'record (incl. statistic gradients)'),
          (cbn, 'conv_statistic_gradients', 'statistic gradients'),
          (cbn.CrossIterationBatchNorm2d, '_window_statistics',
           'window and running statistics (incl. finiteness)'),
          (cbn, 'batch_moments', 'batch moments')]


#: the parts timed with ``--time-parts``: :data:`PHASES`, the layer's whole forward, the
#: normalisation's forward and backward, and finding the conv in the autograd graph
TIMED_PARTS = [(cbn.CrossIterationBatchNorm2d, 'forward', 'forward (all of it)')] + PHASES + [
    (window_norm.WindowBatchNormFunction, 'forward', 'normalisation (Eq. 12)'),
    (window_norm.WindowBatchNormFunction, 'backward', 'backward of the normalisation'),
    (conv_binding.ConvProducer, 'bind', 'finding the conv')]
#: the parts of a forward taken by the one-call step (inside it, C++: torch.profiler shows its parts
#: as ``cbn_mmdet::train_step.*``; its backward is a C++ autograd node)
ONE_CALL_TIMED_PARTS = [(cbn.CrossIterationBatchNorm2d, 'forward', 'forward (all of it)'),
                        (cbn.CrossIterationBatchNorm2d, '_one_call_step', 'one-call step')]
#: BN's part timed with ``--time-parts`` (its backward is one kernel inside autograd)
BN_TIMED_PARTS = [(nn.modules.batchnorm._BatchNorm, 'forward', 'forward (all of it)')]


@contextlib.contextmanager
def wrapping(parts, measure):
    """Replace each ``(owner, attribute, label)`` of ``parts`` by ``measure(fn, label)`` (static
    methods of classes stay static)."""
    originals = [(owner, name, inspect.getattr_static(owner, name)) for owner, name, _ in parts]
    for (owner, name, raw), (_, _, label) in zip(originals, parts):
        if isinstance(raw, staticmethod):
            setattr(owner, name, staticmethod(measure(raw.__func__, label)))
        else:
            setattr(owner, name, measure(raw, label))
    try:
        yield
    finally:
        for owner, name, raw in originals:
            setattr(owner, name, raw)


def counting_phases(totals: Counter):
    """Count the tensor operations inside each of :data:`PHASES` into ``totals``."""
    def counted(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            counter = OpCounter()
            with counter:
                result = fn(*args, **kwargs)
            totals[label] += sum(counter.ops.values())
            return result
        return wrapper
    return wrapping(PHASES, counted)


def timing_parts(totals: Counter, parts):
    """Add the seconds spent inside each of ``parts`` (like :data:`TIMED_PARTS`) to ``totals``."""
    def timed(fn, label):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                totals[label] += time.perf_counter() - start
        return wrapper
    return wrapping(parts, timed)


def time_parts(model, opt, x, steps: int, layers: int, parts) -> dict:
    """Microseconds per layer and step inside each of ``parts``, over ``steps`` steps."""
    totals = Counter()
    with timing_parts(totals, parts):
        for _ in range(steps):
            step(model, opt, x)
    return {label: 1e6 * seconds / (steps * layers) for label, seconds in totals.items()}


def step(model, opt, x):
    model(x).square().mean().backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if x.is_cuda:
        torch.cuda.synchronize()


def variant_step(name, model, opt, x):
    """:func:`step`, with the fused CPU ops off for the ``--python-path`` variants and the
    one-call step off for the fused-forward ones."""
    with (fused.disabled() if name in PYTHON_PATH else
          fused.without_one_call() if name in FUSED_FORWARD else contextlib.nullcontext()):
        step(model, opt, x)


def run(args):
    torch.set_num_threads(args.threads)
    x = torch.randn(args.batch, args.channels, args.size, args.size, device=args.device)
    variants = dict(VARIANTS, **(dict(FUSED_FORWARD, **PYTHON_PATH) if args.python_path else {}),
                    **(baseline_variants(args.baseline) if args.baseline else {}))
    setups = {}
    for name, norm in variants.items():
        model = build(norm, args.layers, args.channels).to(args.device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        for _ in range(args.warmup):
            variant_step(name, model, opt, x)
        setups[name] = (model, opt)
    compile_s = {}
    for name in ('bn', 'cbn') if args.compile else ():
        model = build(VARIANTS[name], args.layers, args.channels).to(args.device)
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
        compiled = torch.compile(model, backend=args.compile)
        start = time.perf_counter()
        for _ in range(args.warmup):  # CBN k=4 has compiled all its graphs after its second step
            step(compiled, opt, x)
        compile_s[name] = time.perf_counter() - start
        setups[name + '-compiled'] = (compiled, opt)
    times = {name: [] for name in setups}
    for _ in range(args.steps):  # round-robin
        for name, (model, opt) in setups.items():
            start = time.perf_counter()
            variant_step(name, model, opt, x)
            times[name].append(time.perf_counter() - start)
    rows = {}
    for name, (model, opt) in setups.items():
        rows[name] = dict(step_ms=1e3 * statistics.median(times[name]), ops=None, top_ops=[])
        if name.endswith('-compiled'):  # (a dispatch mode would re-trace the compiled graph)
            rows[name]['warmup_s'] = compile_s[name[:-len('-compiled')]]
            continue
        counter = OpCounter()
        with counter:
            variant_step(name, model, opt, x)
        rows[name].update(ops=sum(counter.ops.values()), top_ops=counter.ops.most_common(8))
    phases = Counter()
    model, opt = setups['cbn']
    with counting_phases(phases), fused.without_one_call():  # (the phases of the Python forward)
        step(model, opt, x)
    rows['cbn']['phase_ops'] = {label: n / args.layers for label, n in phases.items()}
    if args.trace_ops:
        if args.trace_ops not in setups:
            raise SystemExit(f'--trace-ops {args.trace_ops!r}: not a variant of this run (variants: '
                             f'{", ".join(setups)}; --python-path adds the -python and -fused ones)')
        rows[args.trace_ops]['trace'] = trace_ops(args.trace_ops, *setups[args.trace_ops], x,
                                                  args.layers)
    if args.time_parts:
        rows['bn']['part_us'] = time_parts(*setups['bn'], x, args.steps, args.layers,
                                           BN_TIMED_PARTS)
        for name in ('naive', 'cbn'):
            rows[name]['one_call_us'] = time_parts(*setups[name], x, args.steps, args.layers,
                                                   ONE_CALL_TIMED_PARTS)
            with fused.without_one_call():  # the parts of the Python forward
                rows[name]['part_us'] = time_parts(*setups[name], x, args.steps, args.layers,
                                                   TIMED_PARTS)
    base = rows['bn']
    lines = [f'{args.layers} layers of conv {args.channels}->{args.channels} 3x3 + norm + ReLU, input '
             f'{args.batch}x{args.channels}x{args.size}x{args.size}, {args.device}, {args.threads} '
             f'thread(s), median of {args.steps} interleaved steps', '',
             '| variant | step ms | ms per layer | above BN, ms per layer | ops per layer and step |',
             '|---|---|---|---|---|']
    for name, r in rows.items():
        per_layer = r['step_ms'] / args.layers
        # a compiled variant against compiled BN
        ref = rows['bn-compiled'] if name.endswith('-compiled') else base
        above = (r['step_ms'] - ref['step_ms']) / args.layers
        ops = '-' if r['ops'] is None else f"{r['ops'] / args.layers:.0f}"
        lines.append(f"| {name} | {r['step_ms']:.2f} | {per_layer:.3f} | {above:.3f} | {ops} |")
    print('\n'.join(lines))
    for name, r in rows.items():
        if r['ops'] is not None:
            print(f"{name}: most frequent ops per step: {r['top_ops']}")
        else:
            print(f"{name}: warm-up steps (compilation included) {r['warmup_s']:.1f} s")
    print('cbn, the Python forward (one-call step off): ops per layer and step by part (nested '
          'parts also count in the outer one): ' +
          ', '.join(f'{label} {n:.0f}' for label, n in rows['cbn']['phase_ops'].items()))
    if args.trace_ops:
        print(f'{args.trace_ops}: the operations of one training step, per layer, by the line that '
              'issued them (-: torch\'s own: the conv, autograd, the optimizer):\n' + '\n'.join(
                  f'  {n:5.1f}  {op:<36} {where}' for n, op, where in rows[args.trace_ops]['trace']))
    for name in ('naive', 'cbn'):
        if 'one_call_us' in rows[name]:
            print(f'{name}: microseconds per layer and step with the one-call step: ' + ', '.join(
                f'{label} {us:.0f}' for label, us in rows[name]['one_call_us'].items()))
    for name in ('bn', 'naive', 'cbn'):
        if 'part_us' in rows[name]:
            where = '' if name == 'bn' else ', the Python forward (one-call step off)'
            print(f'{name}{where}: microseconds per layer and step inside each part (nested parts '
                  'also count in the outer one; timed apart from the round-robin): ' + ', '.join(
                      f'{label} {us:.0f}' for label, us in rows[name]['part_us'].items()))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    record.record(args, '\n'.join(lines), __file__)
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
    parser.add_argument('--python-path', action='store_true',
                        help='also time Naive CBN and CBN with the fused CPU ops off (naive-python, '
                        'cbn-python: the path CUDA and torch.compile take) and with the fused ops '
                        'called one by one, without the one-call step (naive-fused, cbn-fused)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--time-parts', action='store_true',
                        help='also time the parts of the layers (BN: its forward)')
    parser.add_argument('--compile', metavar='BACKEND',
                        help='also time BN and CBN under torch.compile with this backend (e.g. '
                             'inductor), each against compiled BN')
    parser.add_argument('--trace-ops', metavar='VARIANT',
                        help='also list the operations of one training step of VARIANT (e.g. '
                        'cbn-python, the path CUDA takes) by the source line that issued them')
    parser.add_argument('--out')
    record.add_arguments(parser)
    return parser.parse_args(argv)


if __name__ == '__main__':
    run(parse_args())
