"""Soak test: many training iterations of a small CBN model; prints resident memory as it goes.

    .venv/bin/python tools/soak_cbn.py [--iters 10000] [--window 4] [--every 1000]

CBN's history is preallocated (window - 1 slots per layer, written in place), so memory must stay flat
after the first iterations. Exits non-zero if resident memory grows by more than --tolerance-mb
between the first report and the end.
"""
import argparse
import resource
import sys
import time

import psutil
import torch
import torch.nn as nn

import cbn_mmdet  # noqa: F401
from cbn_mmdet.models import CrossIterationBatchNorm2d as CBN


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--iters', type=int, default=10000)
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--every', type=int, default=1000)
    parser.add_argument('--tolerance-mb', type=float, default=20.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    k = args.window
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), CBN(16, window=k), nn.ReLU(),
                          nn.Conv2d(16, 32, 3, stride=2, bias=False), CBN(32, window=k), nn.ReLU(),
                          nn.Conv2d(32, 32, 1, bias=False), CBN(32, window=k), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    proc = psutil.Process()
    first = None
    start = time.time()
    for it in range(1, args.iters + 1):
        x = torch.randn(2, 3, 16, 16)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 4, (2, )))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if it % args.every == 0:
            rss = proc.memory_info().rss / 2**20
            first = rss if first is None else first
            print(f'iter {it:6d}  rss {rss:7.1f} MB  growth {rss - first:+6.1f} MB  '
                  f'{(time.time() - start) / it * 1e3:.1f} ms/iter', flush=True)
    growth = proc.memory_info().rss / 2**20 - first
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'done: growth {growth:+.1f} MB after the first report, peak rss {peak:.0f} MB')
    sys.exit(0 if growth <= args.tolerance_mb else 1)


if __name__ == '__main__':
    main()
