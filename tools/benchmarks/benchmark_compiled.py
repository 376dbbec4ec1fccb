"""CBN under ``torch.compile``: training-step time of BN and CBN, eager and compiled, in one process.

The model is mmdet's ResNet (+ FPN) with the same norm everywhere (``frozen_stages=1``,
``norm_eval=False``: stages 2-4 and the FPN train their norms), a loss on the outputs and SGD. Per
variant: the median of interleaved steps after warm-up, the time the first steps took (compilation
included, reported separately), and the FLOPs of one eager training step (torch's
``FlopCounterMode``; CBN's extra weight-gradient products included). Prints a Markdown table; ``--out``
also writes it as JSON.

    .venv/bin/python tools/benchmarks/benchmark_compiled.py [--model r18|r50-fpn] [--size 160 160]
        [--images 2] [--steps 20] [--backend inductor] [--threads 2]
        [--variants bn cbn naive cbn-bf16-history cbn-bf16-product cbn-bf16 cbn-window2
                    cbn-window8 cbn-ops cbn-conv-products]
        [--modes eager compiled] [--profile-parts STEPS] [--out FILE.json]
"""
import argparse
import contextlib
import json
import statistics
import sys
import time

import torch

sys.path.insert(0, __file__.rsplit('/tools/', 1)[0])
import record  # noqa: E402
from flops import counter as flop_counter  # noqa: E402

NORMS = {'bn': dict(type='BN', requires_grad=True),
         'cbn': dict(type='CBN', window=4, requires_grad=True),
         'naive': dict(type='CBN', window=4, compensate=False, requires_grad=True),
         # the history's weight-sized ∂var/∂θ kept in bfloat16: half its memory traffic
         'cbn-bf16-history': dict(type='CBN', window=4, history_dtype='bfloat16',
                                  requires_grad=True),
         # the ∂var/∂θ product on bfloat16 operands (fast where the CPU has bfloat16 units), and
         # that with the bfloat16 history
         'cbn-bf16-product': dict(type='CBN', window=4, var_grad_dtype='bfloat16',
                                  requires_grad=True),
         'cbn-bf16': dict(type='CBN', window=4, var_grad_dtype='bfloat16',
                          history_dtype='bfloat16', requires_grad=True),
         # other windows: the same FLOPs (one product per step), k − 1 past entries read per step
         'cbn-window2': dict(type='CBN', window=2, requires_grad=True),
         'cbn-window8': dict(type='CBN', window=8, requires_grad=True),
         # the design before the one-call step: the fused ops called one by one from Python
         'cbn-ops': dict(type='CBN', window=4, requires_grad=True),
         # every ∂var/∂θ product as the weight-gradient convolution (before 1×1 convs with few
         # positions took a matrix product)
         'cbn-conv-products': dict(type='CBN', window=4, requires_grad=True)}


def _variant_context(variant: str):
    """What a variant changes around its steps (CBN's code paths, not its configuration)."""
    from cbn_mmdet.ops import fused
    from cbn_mmdet.ops import statistics as cbn_statistics  # (this module uses the stdlib's)
    if variant == 'cbn-ops':  # the fused ops one by one, without the one-call training step
        return fused.without_one_call()
    if variant == 'cbn-conv-products':
        return _patched(cbn_statistics, 'MATMUL_MAX_POSITIONS', 0)
    return contextlib.nullcontext()


@contextlib.contextmanager
def _patched(owner, name: str, value):
    saved = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, saved)


def build(model: str, norm: str) -> torch.nn.Module:
    import cbn_mmdet  # noqa: F401  (registers CBN)
    from mmdet.models.backbones import ResNet
    from mmdet.models.necks import FPN
    torch.manual_seed(0)
    depth = 18 if model == 'r18' else 50
    backbone = ResNet(depth=depth, frozen_stages=1, norm_eval=False, norm_cfg=NORMS[norm],
                      out_indices=(0, 1, 2, 3))
    if model == 'r18':
        return backbone
    in_channels = [256, 512, 1024, 2048]
    neck = FPN(in_channels, 256, 5, norm_cfg=NORMS[norm])
    return torch.nn.Sequential(backbone, neck)


def flops(model, x) -> int:
    counter = flop_counter()
    with counter:
        _loss(model(x)).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def _loss(outputs):
    return sum(o.float().square().mean() for o in outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', choices=['r18', 'r50-fpn'], default='r18')
    parser.add_argument('--size', type=int, nargs=2, default=[160, 160])
    parser.add_argument('--images', type=int, default=2)
    parser.add_argument('--steps', type=int, default=20, help='timed steps per variant')
    parser.add_argument('--warmup', type=int, default=6,
                        help='untimed steps first (CBN k=4 reaches its steady-state graph at step 2)')
    parser.add_argument('--backend', default='inductor')
    parser.add_argument('--threads', type=int, default=torch.get_num_threads())
    parser.add_argument('--variants', nargs='+', default=['bn', 'cbn'], choices=list(NORMS))
    parser.add_argument('--modes', nargs='+', default=['eager', 'compiled'],
                        choices=['eager', 'compiled'])
    parser.add_argument('--out')
    parser.add_argument('--profile-parts', type=int, default=0, metavar='STEPS',
                        help='after the timing, profile STEPS more steps of each variant and print '
                             "the CBN step's parts (ms per step, torch.profiler's self CPU time)")
    record.add_arguments(parser)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    x = torch.randn(args.images, 3, *args.size)
    runs = {}
    for variant in args.variants:
        for mode in args.modes:
            model = build(args.model, variant)
            model.train()  # (mmdet's ResNet.train returns None)
            opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                  momentum=0.9)
            forward = torch.compile(model, backend=args.backend) if mode == 'compiled' else model

            def step(model=model, opt=opt, forward=forward, variant=variant):
                with _variant_context(variant):
                    _loss(forward(x)).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for _ in range(args.warmup):
                step()
            runs[variant, mode] = dict(step=step, warmup_s=time.perf_counter() - start, times=[],
                                       flops=flops(model, x) if mode == 'eager' else None,
                                       history_mb=_history_bytes(model) / 2**20)
    for _ in range(args.steps):  # round-robin: the machine's drift hits every variant alike
        for run in runs.values():
            start = time.perf_counter()
            run['step']()
            run['times'].append(time.perf_counter() - start)
    base = {mode: statistics.median(runs['bn', mode]['times']) for mode in args.modes
            if ('bn', mode) in runs}
    base_flops = runs.get(('bn', 'eager'), {}).get('flops')
    rows = []
    for (variant, mode), run in runs.items():
        ms = 1e3 * statistics.median(run['times'])
        flop_ratio = (runs[variant, 'eager']['flops'] / base_flops
                      if base_flops and (variant, 'eager') in runs else None)
        rows.append(dict(variant=variant, mode=mode, step_ms=ms,
                         ratio_to_bn=ms / (1e3 * base[mode]) if mode in base else None,
                         flop_ratio=flop_ratio, first_steps_s=run['warmup_s'],
                         gflops=None if run['flops'] is None else run['flops'] / 1e9,
                         history_mb=run['history_mb']))
    lines = [f'{args.model}, {args.images} x 3 x {args.size[0]}x{args.size[1]}, {args.threads} '
             f'thread(s), backend {args.backend}, median of {args.steps} interleaved steps after '
             f'{args.warmup}', '',
             '| norm | mode | step ms | / BN (same mode) | FLOPs / BN | target 1 + 1.15 (FLOPs - 1) '
             '| first steps s (compilation) | history MB |', '|---|---|---|---|---|---|---|---|']
    for r in rows:
        target = None if r['flop_ratio'] is None else 1 + 1.15 * (r['flop_ratio'] - 1)
        lines.append(f"| {r['variant']} | {r['mode']} | {r['step_ms']:.1f} | "
                     f"{_fmt(r['ratio_to_bn'])} | {_fmt(r['flop_ratio'])} | {_fmt(target)} | "
                     f"{r['first_steps_s']:.1f} | {r['history_mb']:.0f} |")
    if args.profile_parts:
        lines += [''] + _profile_parts(runs, args.profile_parts)
    print('\n'.join(lines))
    if args.out:
        with open(args.out, 'w') as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    record.record(args, '\n'.join(lines), __file__, argv)


def _profile_parts(runs, steps: int):
    """The CBN layers' parts per step: the one-call step's (``cbn_mmdet::train_step.*``,
    ``cbn_mmdet::normalise``) and the fused ops' (``cbn_mmdet::*``), summed over the layers."""
    parts = {}
    for key, run in runs.items():
        with torch.profiler.profile() as prof:
            for _ in range(steps):
                run['step']()
        parts[key] = {e.key: e.self_cpu_time_total / 1e3 / steps for e in prof.key_averages()
                      if e.key.startswith('cbn_mmdet::')}
    names = sorted({name for found in parts.values() for name in found})
    if not names:
        return []
    lines = [f"The CBN step's parts, ms per step (self CPU time, {steps} profiled steps):", '',
             '| norm | mode | ' + ' | '.join(n.replace('cbn_mmdet::', '') for n in names) + ' |',
             '|---|---|' + '---|' * len(names)]
    for (variant, mode), found in parts.items():
        if found:
            lines.append(f'| {variant} | {mode} | '
                         + ' | '.join(f'{found.get(n, 0.0):.2f}' for n in names) + ' |')
    return lines


def _history_bytes(model) -> int:
    """What the CBN layers' histories hold (every past entry is read at each step)."""
    return sum(m.history.nbytes() for m in model.modules() if hasattr(m, 'history'))


def _fmt(value) -> str:
    return '-' if value is None else f'{value:.2f}'


if __name__ == '__main__':
    main()
