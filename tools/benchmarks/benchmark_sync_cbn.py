"""SyncCBN's cost on several CPU processes (gloo, DDP): step time against BN and CBN in the same run,
and the normalisation's own communication per step (collectives and bytes sent by each process).

A stack of conv + norm + ReLU layers; every process trains on its own batch. Prints the table on
rank 0; ``--out`` also writes it as JSON. (torch's SyncBatchNorm needs a GPU, so it is not a row.)

    .venv/bin/python tools/benchmarks/benchmark_sync_cbn.py [--processes 2] [--layers 10]
        [--channels 64] [--size 32] [--batch 2] [--window 4] [--steps 30] [--warmup 5] [--out FILE]
"""
import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

sys.path.insert(0, __file__.rsplit('/tools/', 1)[0])
import record  # noqa: E402
from cbn_mmdet.models import (CrossIterationBatchNorm2d,  # noqa: E402
                              SyncCrossIterationBatchNorm2d)

VARIANTS = {
    'bn': lambda c, k: nn.BatchNorm2d(c),
    'cbn': lambda c, k: CrossIterationBatchNorm2d(c, window=k),
    'sync-cbn': lambda c, k: SyncCrossIterationBatchNorm2d(c, window=k),
}
COLLECTIVES = ('all_gather', 'all_gather_into_tensor', 'all_reduce')


class CommCounter:
    """Counts the collectives called through ``torch.distributed`` (DDP's reducer bypasses them)."""

    def __init__(self):
        self.calls, self.bytes, self.active = 0, 0, False
        for name in COLLECTIVES:
            setattr(dist, name, self._wrap(getattr(dist, name)))

    def _wrap(self, collective):
        def counted(tensor_or_list, tensor=None, *args, **kwargs):
            if self.active:
                sent = tensor if torch.is_tensor(tensor) else tensor_or_list
                self.calls += 1
                self.bytes += sent.numel() * sent.element_size()
            return collective(tensor_or_list, *args, **kwargs) if tensor is None else \
                collective(tensor_or_list, tensor, *args, **kwargs)
        return counted


def build(variant, args):
    torch.manual_seed(0)
    mods = []
    for _ in range(args.layers):
        mods += [nn.Conv2d(args.channels, args.channels, 3, padding=1, bias=False),
                 VARIANTS[variant](args.channels, args.window), nn.ReLU()]
    return nn.parallel.DistributedDataParallel(nn.Sequential(*mods))


def worker(args):
    os.environ.update(MASTER_ADDR='127.0.0.1', MASTER_PORT=args.port)
    dist.init_process_group('gloo', rank=args.rank, world_size=args.processes)
    torch.set_num_threads(1)
    counter = CommCounter()
    gen = torch.Generator().manual_seed(args.rank)
    x = torch.randn(args.batch, args.channels, args.size, args.size, generator=gen)
    setups = {}
    for name in VARIANTS:
        model = build(name, args)
        setups[name] = (model, torch.optim.SGD(model.parameters(), lr=1e-3))
    times = {name: [] for name in VARIANTS}
    comm = {}
    for step in range(args.warmup + args.steps):
        for name, (model, opt) in setups.items():  # interleaved: drift hits all alike
            dist.barrier()
            counter.calls = counter.bytes = 0
            counter.active = step == args.warmup
            start = time.perf_counter()
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            elapsed = time.perf_counter() - start
            counter.active = False
            if step == args.warmup:
                comm[name] = (counter.calls, counter.bytes)
            if step >= args.warmup:
                times[name].append(elapsed)
    rows = []
    bn = statistics.median(times['bn'])
    for name in VARIANTS:
        t = statistics.median(times[name])
        rows.append(dict(variant=name, step_ms=1e3 * t, ratio_to_bn=t / bn,
                         collectives_per_step=comm[name][0],
                         kib_sent_per_step=comm[name][1] / 1024))
    if args.rank == 0:
        print(f'{args.processes} gloo processes × batch {args.batch}, {args.layers} × conv 3x3 '
              f'{args.channels}→{args.channels} + norm + ReLU on {args.size}², window {args.window}, '
              f'{args.steps} steps (median), 1 thread each')
        print('| variant | step (ms) | × BN | collectives / step | KiB sent / step |')
        print('|---|---|---|---|---|')
        for r in rows:
            print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['ratio_to_bn']:.2f} | "
                  f"{r['collectives_per_step']} | {r['kib_sent_per_step']:.1f} |")
        if args.out:
            with open(args.out, 'w') as f:
                json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    dist.barrier()
    sys.stdout.flush()
    # no destroy_process_group: the rank that hosts the store may leave first, and a late rank's
    # teardown would then wait for it; exiting directly skips gloo's teardown altogether
    os._exit(0)


def launch(args):
    """Start ``--processes`` copies of this script (one per rank); returns rank 0's output."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = str(s.getsockname()[1])
    argv = [item for key, value in vars(args).items() if value is not None
            and key not in ('rank', 'port') for item in (f'--{key}', str(value))]
    procs = [subprocess.Popen([sys.executable, __file__, *argv, '--rank', str(r), '--port', port],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS='1'))
             for r in range(args.processes)]
    try:
        outputs = [p.communicate(timeout=args.timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise RuntimeError(f'benchmark processes did not finish within {args.timeout} s')
    for p, out in zip(procs, outputs):
        if p.returncode != 0:
            raise RuntimeError(out[-3000:])
    return outputs[0]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--processes', type=int, default=2)
    parser.add_argument('--layers', type=int, default=10)
    parser.add_argument('--channels', type=int, default=64)
    parser.add_argument('--size', type=int, default=32)
    parser.add_argument('--batch', type=int, default=2)
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--steps', type=int, default=30)
    parser.add_argument('--warmup', type=int, default=5)
    parser.add_argument('--out')
    parser.add_argument('--timeout', type=int, default=900, help='seconds for all processes')
    parser.add_argument('--rank', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--port', help=argparse.SUPPRESS)
    record.add_arguments(parser)
    return parser.parse_args(argv)


def main():
    args = parse_args()
    if args.rank is None:
        output = launch(args)
        print(output, end='')
        record.record(args, output, __file__)
    else:
        worker(args)


if __name__ == '__main__':
    main()
