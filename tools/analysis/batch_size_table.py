"""Test accuracy against batch size for BN, GN, BRN, Naive CBN and CBN (issue item 3; analog of the
paper's Table 3 / Figure 3 / Table 9 at toy scale).

A small plain CNN (:class:`common.SmallCNN`: four conv-norm-ReLU layers, 16-64 channels, GAP, linear)
is trained on scikit-learn's digits (upsampled to 16×16; fixed split 1197 train / 600 test images) at
batch sizes 16, 8, 4, 2, 1 with each normalizer, several seeds, and evaluated on the test split (eval
mode: running statistics for BN, BRN and both CBNs). The setting follows the paper's Section 4.1 where
it can at this scale:

* SGD, momentum 0.9, weight decay 1e-4 on all weights (γ, β included), cosine decay per iteration,
  learning rate scaled linearly with the batch size (``base_lr · bs / 16``), the same number of epochs
  (so of images seen) at every batch size; the last, incomplete batch of an epoch is dropped.
* CBN and Naive CBN: ``k = min(⌈16 / bs⌉, 8)`` (at least 16 examples in the window; at bs 16 k = 1 is BN)
  after a burn-in of ``--burn-in`` epochs with k = 1; running statistics from the window (the layer's
  default).
* BRN (``'BRN'``): plain BN for the same burn-in iterations, then r_max and d_max relaxed linearly to 3
  and 5, reached at 60 % (r_max) and 40 % (d_max) of the remaining iterations (Ioffe's 5k / 40k / 25k
  steps do not transfer to a run of a few thousand iterations; this keeps their order).
* GN: 8 groups (2-8 channels per group here; 32 groups of the GN paper need ≥ 32 channels).
* BN momentum 0.1 for the running statistics.

``--model cnn-1x1`` (a second table): five layers, strides 1, 2, 2, 2, 2, so the last two normalise
2×2 and 1×1 maps and the last one has only ``bs`` values per channel: an exaggerated version of the
small late-stage maps of an ImageNet ResNet, where batch statistics are noisiest. At batch size 1 it
has one value per channel, which BN, BRN and CBN (whose current batch must have more than one) refuse.

With the default model, at batch size 1 every layer still has several values per channel (16×16 … 4×4 spatial positions), so BN
and BRN *run* (torch refuses only one value per channel); each batch is then normalised by its own
image's statistics, while evaluation uses running averages. Whatever happens is reported.

Usage::

    .venv/bin/python tools/analysis/batch_size_table.py                 # full table
    .venv/bin/python tools/analysis/batch_size_table.py --quick         # seconds (tests)
    .venv/bin/python tools/analysis/batch_size_table.py --time-only     # per-iteration cost, threads

Prints the table; writes ``batch_size_table.{md,json,png}`` (``batch_size_table_1x1.*`` for
``--model cnn-1x1``) to ``--out``.
"""
import argparse
import json
import math
import os.path as osp
import statistics
import time

import torch
import torch.nn.functional as F

from common import (CNN_VARIANTS, REPO_ROOT, SmallCNN, accuracy, ensure_dir, load_digits_tensors, markdown_table,
                    norm_factory, plt, set_active_window)

METHODS = ('BN', 'GN', 'BRN', 'NaiveCBN', 'CBN')
LABELS = {'BN': 'BN', 'GN': 'GN', 'BRN': 'BRN', 'NaiveCBN': 'Naive CBN', 'CBN': 'CBN'}


def window_for(batch_size):
    return min(math.ceil(16 / batch_size), 8)


def train_one(method, batch_size, seed, args, data, max_iters=None):
    """Train one model; returns a dict with its test accuracy, final training loss and wall time."""
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(seed)
    ipe = len(y_train) // batch_size
    total = ipe * args.epochs
    burn = ipe * args.burn_in
    window = window_for(batch_size)
    rest = total - burn
    norm = norm_factory(method, window=window,
                        brn_iters=(burn, burn + max(1, int(0.6 * rest)), burn + max(1, int(0.4 * rest))))
    model = SmallCNN(norm, **CNN_VARIANTS[args.model])
    model.train()
    base = args.lr * batch_size / 16
    opt = torch.optim.SGD(model.parameters(), lr=base, momentum=0.9, weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    losses = []
    stop = total if max_iters is None else min(total, max_iters)
    try:
        it, losses, diverged = _train_loop(model, opt, x_train, y_train, batch_size, ipe, total, burn,
                                           window, base, gen, stop)
        failure = None
    except ValueError as err:  # e.g. BN with one value per channel ('Expected more than 1 value')
        failure, diverged = str(err).split('\n')[0], True
    seconds = time.perf_counter() - start
    acc = float('nan') if diverged else accuracy(model, x_test, y_test)
    if not math.isfinite(acc):
        diverged = True
    tail = losses[-min(len(losses), ipe):] if failure is None and losses else [float('nan')]
    return dict(method=method, batch_size=batch_size, seed=seed, window=window if 'CBN' in method else 1,
                iters=it if failure is None else 0, seconds=seconds, test_acc=acc,
                train_loss=sum(tail) / len(tail), diverged=diverged, failure=failure)


def _train_loop(model, opt, x_train, y_train, batch_size, ipe, total, burn, window, base, gen, stop):
    it, losses, diverged = 0, [], False
    while it < stop and not diverged:
        order = torch.randperm(len(y_train), generator=gen)
        for b in range(ipe):
            if it >= stop:
                break
            for group in opt.param_groups:
                group['lr'] = base * 0.5 * (1 + math.cos(math.pi * it / total))
            set_active_window(model, 1 if it < burn else window)
            idx = order[b * batch_size:(b + 1) * batch_size]
            loss = F.cross_entropy(model(x_train[idx]), y_train[idx])
            if not torch.isfinite(loss):
                diverged = True
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            it += 1
    return it, losses, diverged


def time_only(args, data):
    """Per-iteration training cost at bs 16 and 1, BN and CBN, with 1 and 2 threads."""
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for method in ('BN', 'CBN'):
            for bs in (16, 1):
                r = train_one(method, bs, 0, argparse.Namespace(**{**vars(args), 'burn_in': 0}), data,
                              max_iters=200)
                rows.append([threads, method, bs, f"{1000 * r['seconds'] / r['iters']:.2f}"])
    print(markdown_table(['threads', 'method', 'batch size', 'ms / iteration'], rows))


def mean_std(values):
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return float('nan'), float('nan')
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=osp.join(REPO_ROOT, 'docs', 'evidence'))
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 8, 4, 2, 1])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--burn-in', type=int, default=1, help='epochs with k = 1 (CBN) / BN (BRN)')
    parser.add_argument('--lr', type=float, default=0.1, help='learning rate at batch size 16')
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--model', default='cnn', choices=sorted(CNN_VARIANTS),
                        help="'cnn-1x1': the last layers normalise 2×2 and 1×1 maps")
    parser.add_argument('--quick', action='store_true', help='a few-second run (tests)')
    parser.add_argument('--time-only', action='store_true', help='measure iteration cost and exit')
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.seeds, args.epochs, args.burn_in = [16, 8], [0, 1], 1, 0
    data = load_digits_tensors(size=16)
    if args.time_only:
        time_only(args, data)
        return None
    torch.set_num_threads(args.threads)
    out = ensure_dir(args.out)
    start = time.time()
    runs = []
    for bs in args.batch_sizes:
        for method in args.methods:
            for seed in args.seeds:
                r = train_one(method, bs, seed, args, data)
                runs.append(r)
                print(f"[batch_size_table] bs={bs} {method:8s} seed={seed} k={r['window']} "
                      f"acc={100 * r['test_acc']:.2f} loss={r['train_loss']:.3f} "
                      f"{r['seconds']:.1f} s (total {time.time() - start:.0f} s)", flush=True)
    wall = time.time() - start

    header = ['method'] + [f'bs={bs}' for bs in args.batch_sizes]
    rows, summary, failures = [], {}, {}
    for method in args.methods:
        row = [LABELS[method]]
        for bs in args.batch_sizes:
            sel = [r for r in runs if r['method'] == method and r['batch_size'] == bs]
            m, s = mean_std([100 * r['test_acc'] for r in sel])
            failed = [r['failure'] for r in sel if r['failure']]
            bad = sum(r['diverged'] for r in sel) - len(failed)
            summary[(method, bs)] = (m, s, bad)
            cell = '–' if not math.isfinite(m) else f'{m:.1f} ± {s:.1f}'
            if failed:
                failures.setdefault(failed[0], []).append(f'{LABELS[method]} bs={bs}')
                cell += f' ({len(failed)}/{len(sel)} cannot train¹)'
            row.append(cell + (f' ({bad}/{len(sel)} diverged)' if bad else ''))
        rows.append(row)
    loss_rows = [[LABELS[method]] + [
        f"{mean_std([r['train_loss'] for r in runs if r['method'] == method and r['batch_size'] == bs])[0]:.3f}"
        for bs in args.batch_sizes] for method in args.methods]
    k_row = ['CBN window k'] + [str(window_for(bs)) for bs in args.batch_sizes]
    time_rows = [[LABELS[method]] + [
        f"{sum(r['seconds'] for r in runs if r['method'] == method and r['batch_size'] == bs):.0f}"
        for bs in args.batch_sizes] for method in args.methods]
    command = (f'.venv/bin/python tools/analysis/batch_size_table.py --methods {" ".join(args.methods)} '
               f'--batch-sizes {" ".join(map(str, args.batch_sizes))} --seeds {" ".join(map(str, args.seeds))} '
               f'--epochs {args.epochs} --burn-in {args.burn_in} --lr {args.lr} '
               f'--weight-decay {args.weight_decay} --threads {args.threads}' +
               (f' --model {args.model}' if args.model != 'cnn' else ''))
    name = 'batch_size_table' + ('' if args.model == 'cnn' else '_' + args.model.replace('cnn-', ''))
    md = (f'# Batch size table (item 3), model {args.model!r}: {CNN_VARIANTS[args.model]}\n\nCommand: `{command}`\n\n'
          f'Wall time: {wall:.0f} s ({len(runs)} runs, {args.threads} thread(s))\n\n'
          f'Test accuracy (%), mean ± std over seeds {args.seeds} (600 test images):\n\n' +
          markdown_table(header, rows + [k_row]) +
          ''.join(f'\n\n¹ {", ".join(where)}: `{message}`' for message, where in failures.items()) +
          '\n\nFinal training loss (mean over the last epoch, mean over seeds):\n\n' +
          markdown_table(header, loss_rows) +
          '\n\nTraining time (s, all seeds):\n\n' + markdown_table(header, time_rows) + '\n')
    print(md)
    with open(osp.join(out, f'{name}.md'), 'w') as f:
        f.write(md)
    with open(osp.join(out, f'{name}.json'), 'w') as f:
        json.dump(dict(args=vars(args), runs=runs, wall_seconds=wall), f)

    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    for method in args.methods:
        bss = [bs for bs in args.batch_sizes if math.isfinite(summary[(method, bs)][0])]
        ax.errorbar(bss, [summary[(method, bs)][0] for bs in bss],
                    yerr=[summary[(method, bs)][1] for bs in bss], marker='o', capsize=3,
                    label=LABELS[method])
    ax.set_xscale('log', base=2)
    ax.set_xticks(args.batch_sizes)
    ax.set_xticklabels([str(b) for b in args.batch_sizes])
    ax.invert_xaxis()
    ax.set_xlabel('batch size')
    ax.set_ylabel('test accuracy (%)')
    ax.set_title(f'digits, {args.model}, {args.epochs} epochs, {len(args.seeds)} seeds')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(osp.join(out, f'{name}.png'), dpi=110)
    pyplot.close(fig)
    return runs


if __name__ == '__main__':
    main()
