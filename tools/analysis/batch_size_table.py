"""Test accuracy against batch size for BN, GN, BRN, Naive CBN and CBN (the paper's Table 3 at toy scale).

Trains a small CNN on scikit-learn's digits at batch sizes 16 to 1 with each normalizer and several
seeds; evaluates it on the test split. Design: docs/analysis.md. Prints the table; writes
``batch_size_table.{md,json,png}`` (``--model cnn-1x1``: ``batch_size_table_1x1.*``) to ``--out``.

    .venv/bin/python tools/analysis/batch_size_table.py                 # full table
    .venv/bin/python tools/analysis/batch_size_table.py --quick         # seconds (tests)
    .venv/bin/python tools/analysis/batch_size_table.py --time-only     # per-iteration cost, threads
"""
import argparse
import math
import time

import torch
import torch.nn.functional as F

from common import (CNN_VARIANTS, Report, SmallCNN, accuracy, analysis_parser, format_mean_std,
                    load_digits_tensors, markdown_table, mean_std, norm_factory, plt, save_figure,
                    set_active_window)

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


def plot(path, args, summary):
    """Mean test accuracy ± std over seeds against the batch size, a line per method."""
    pyplot = plt()
    fig, ax = pyplot.subplots(figsize=(6.5, 4.2))
    for method in args.methods:
        bss = [bs for bs in args.batch_sizes if summary[(method, bs)][0] is not None]
        ax.errorbar(bss, [summary[(method, bs)][0] for bs in bss],
                    yerr=[summary[(method, bs)][1] or 0.0 for bs in bss], marker='o', capsize=3,
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
    save_figure(fig, path)


def main(argv=None):
    parser = analysis_parser(__doc__, quick='a few-second run (tests)')
    parser.add_argument('--methods', nargs='+', default=list(METHODS), choices=METHODS)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 8, 4, 2, 1])
    parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    parser.add_argument('--epochs', type=int, default=6)
    parser.add_argument('--burn-in', type=int, default=1, help='epochs with k = 1 (CBN) / BN (BRN)')
    parser.add_argument('--lr', type=float, default=0.1, help='learning rate at batch size 16')
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--model', default='cnn', choices=sorted(CNN_VARIANTS),
                        help="'cnn-1x1': the last layers normalise 2×2 and 1×1 maps")
    parser.add_argument('--time-only', action='store_true', help='measure iteration cost and exit')
    args = parser.parse_args(argv)
    if args.quick:
        args.batch_sizes, args.seeds, args.epochs, args.burn_in = [16, 8], [0, 1], 1, 0
    data = load_digits_tensors(size=16)
    if args.time_only:
        time_only(args, data)
        return None
    torch.set_num_threads(args.threads)
    name = 'batch_size_table' + ('' if args.model == 'cnn' else '_' + args.model.replace('cnn-', ''))
    report = Report(args.out, name)
    runs = []
    for bs in args.batch_sizes:
        for method in args.methods:
            for seed in args.seeds:
                r = train_one(method, bs, seed, args, data)
                runs.append(r)
                print(f"[batch_size_table] bs={bs} {method:8s} seed={seed} k={r['window']} "
                      f"acc={100 * r['test_acc']:.2f} loss={r['train_loss']:.3f} "
                      f"{r['seconds']:.1f} s (total {report.seconds:.0f} s)", flush=True)
    wall = report.seconds

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
            cell = format_mean_std(m, s)
            if failed:
                failures.setdefault(failed[0], []).append(f'{LABELS[method]} bs={bs}')
                cell += f' ({len(failed)}/{len(sel)} cannot train¹)'
            row.append(cell + (f' ({bad}/{len(sel)} diverged)' if bad else ''))
        rows.append(row)
    loss_rows = [[LABELS[method]] + [
        format_mean_std(mean_std(r['train_loss'] for r in runs
                                 if r['method'] == method and r['batch_size'] == bs)[0], None, digits=3)
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
    md = (f'# Batch size table, model {args.model!r}: {CNN_VARIANTS[args.model]}\n\nCommand: `{command}`\n\n'
          f'Wall time: {wall:.0f} s ({len(runs)} runs, {args.threads} thread(s))\n\n'
          f'Test accuracy (%), mean ± std over seeds {args.seeds} (600 test images):\n\n' +
          markdown_table(header, rows + [k_row]) +
          ''.join(f'\n\n¹ {", ".join(where)}: `{message}`' for message, where in failures.items()) +
          '\n\nFinal training loss (mean over the last epoch, mean over seeds):\n\n' +
          markdown_table(header, loss_rows) +
          '\n\nTraining time (s, all seeds):\n\n' + markdown_table(header, time_rows) + '\n')
    report.write(md, dict(args=vars(args), runs=runs, wall_seconds=wall),
                 plot=lambda path: plot(path, args, summary))
    return runs


if __name__ == '__main__':
    main()
