"""How well CBN, Naive CBN and BN estimate the statistics of the last k batches under the current weights.

Trains a small ResNet with CBN(k) on scikit-learn's digits and, every few iterations, compares each CBN
layer's window statistics with an oracle recomputed under the current weights. Design: docs/analysis.md.

    .venv/bin/python tools/analysis/statistics_estimation.py            # full study, ~1-2 min
    .venv/bin/python tools/analysis/statistics_estimation.py --quick    # seconds (tests)

Prints the tables; writes ``statistics_estimation.{md,json,png}`` and ``..._layers.png`` to ``--out``.
"""
import copy
from collections import deque

import torch
import torch.nn.functional as F

from cbn_mmdet.ops.statistics import batch_moments, window_moments
from common import (ESTIMATES, PLOTTED_ESTIMATES, Report, SmallResNet, analysis_parser, cbn_layers, errors,
                    fmt, load_digits_tensors, markdown_table, mean, norm_factory, plot_errors, plt,
                    save_figure, set_active_window)


def window_statistics(layer, layer_input):
    """``(cbn_mean, cbn_var, naive_mean, naive_var, batch_mean, batch_var)`` of the forward just run.

    Called right after ``layer``'s training forward on ``layer_input``.
    """
    past = layer.past_window()
    batch_mean, batch_var = (t.double() for t in batch_moments(layer_input.detach()))
    count = layer_input.shape[0] * layer_input.shape[2] * layer_input.shape[3]
    n = count + (0 if past is None else past['count'].double())
    cbn_mean = layer.running_mean.double().clone()
    cbn_var = layer.running_var.double() * (n - 1) / n  # momentum=1: running_var = σ̄² n/(n−1)
    if past is None:
        return cbn_mean, cbn_var, batch_mean, batch_var, batch_mean.clone(), batch_var.clone()
    naive_mean, naive_var, _ = window_moments(batch_mean, batch_var, past['mean'].double(),
                                              past['var'].double(), past['valid'].double())
    return cbn_mean, cbn_var, naive_mean, naive_var, batch_mean, batch_var


@torch.no_grad()
def oracle_statistics(model, batches, used):
    """Pooled mean/var of every CBN layer's input over ``batches`` under the current network.

    ``used[name] = (mean, var)``: the statistics each CBN layer normalised with at this iteration; the
    copy normalises every batch with them (eval mode = BN with these running statistics).
    """
    net = copy.deepcopy(model).eval()
    for m in net.modules():
        m._forward_pre_hooks.clear()  # the copy must not feed the training run's recorders
    layers = cbn_layers(net)
    captured, handles = {}, []
    for name, layer in layers.items():
        mean, var = used[name]
        layer.running_mean.copy_(mean)
        layer.running_var.copy_(var)
        handles.append(layer.register_forward_pre_hook(
            lambda mod, inp, name=name: captured.__setitem__(name, batch_moments(inp[0].double()))))
    net(torch.cat(list(batches)).double() if next(net.parameters()).dtype == torch.float64
        else torch.cat(list(batches)))
    for h in handles:
        h.remove()
    return captured


def conv_of(model):
    """``{CBN layer name: the conv producing its input}`` (found by one forward on a copy)."""
    net = copy.deepcopy(model).eval()
    by_output, pairs, handles = {}, {}, []
    names = {m: n for n, m in net.named_modules()}
    for m in net.modules():
        if isinstance(m, torch.nn.Conv2d):
            handles.append(m.register_forward_hook(
                lambda mod, inp, out: by_output.__setitem__(id(out), names[mod])))
    for name, layer in cbn_layers(net).items():
        handles.append(layer.register_forward_pre_hook(
            lambda mod, inp, name=name: pairs.__setitem__(name, by_output.get(id(inp[0])))))
    with torch.no_grad():
        net(torch.zeros(2, 1, 16, 16))
    for h in handles:
        h.remove()
    modules = dict(model.named_modules())
    missing = [n for n, c in pairs.items() if c is None]
    if missing:
        raise RuntimeError(f'CBN layers {missing} do not follow a conv')
    return {name: modules[cname] for name, cname in pairs.items()}


@torch.no_grad()
def own_layer_exact(convs, recorded_inputs):
    """Per CBN layer: pooled mean/var of ``conv_l(θ_t)`` applied to the recorded conv inputs."""
    out = {}
    for name, conv in convs.items():
        acts = torch.cat([conv(inputs[name]) for inputs in recorded_inputs if name in inputs])
        out[name] = batch_moments(acts.double())
    return out


def run(k, lr, args, data):
    """One training run with CBN(window=k) at learning rate ``lr``; returns its measurement records."""
    x_train, y_train = data
    torch.manual_seed(args.seed)
    model = SmallResNet(norm_factory('CBN', window=k, momentum=1.0, running_stats='window'))
    if args.freeze_convs:
        for m in model.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.weight.requires_grad_(False)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=args.weight_decay)
    layers = cbn_layers(model)
    convs = conv_of(model)
    conv_inputs = {}  # CBN layer name -> the input of its conv in this iteration's training forward
    for name, conv in convs.items():
        conv.register_forward_pre_hook(
            lambda mod, inp, name=name: conv_inputs.__setitem__(name, inp[0].detach().clone()))
    cbn_inputs = {}  # CBN layer name -> its input in this iteration's training forward
    for name, layer in layers.items():
        layer.register_forward_pre_hook(
            lambda mod, inp, name=name: cbn_inputs.__setitem__(name, inp[0].detach()))
    gen = torch.Generator().manual_seed(args.seed)
    batches = deque(maxlen=k)
    recorded_inputs = deque(maxlen=k)
    records, losses = [], []
    start_measuring = args.burn_in + k  # window full: k−1 past iterations recorded with window k
    order = torch.randperm(len(y_train), generator=gen)
    pos = 0
    for it in range(args.iters):
        set_active_window(model, 1 if it < args.burn_in else k)
        if pos + args.batch_size > len(order):
            order, pos = torch.randperm(len(y_train), generator=gen), 0
        idx = order[pos:pos + args.batch_size]
        pos += args.batch_size
        x, y = x_train[idx], y_train[idx]
        batches.append(x)
        loss = F.cross_entropy(model(x), y)
        recorded_inputs.append(dict(conv_inputs))
        losses.append(loss.item())
        measure = it >= start_measuring and (it - start_measuring) % args.every == 0
        if measure:
            stats = {name: window_statistics(layer, cbn_inputs[name]) for name, layer in layers.items()}
            used = {name: (s[0], s[1]) for name, s in stats.items()}
            oracle = oracle_statistics(model, batches, used)
            own = own_layer_exact(convs, recorded_inputs)
            for li, (name, s) in enumerate(stats.items()):
                o_mean, o_var = oracle[name]
                for method, (m, v) in zip(ESTIMATES, ((s[0], s[1]), (s[2], s[3]), (s[4], s[5]),
                                                      own[name])):
                    e_mu, e_sigma = errors(m, v, o_mean, o_var)
                    records.append(dict(k=k, lr=lr, iter=it, layer=name, layer_index=li,
                                        method=method, e_mu=e_mu, e_sigma=e_sigma))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return records, mean(losses[-50:])


def summarise(records, ks, lrs, layer_names):
    summary = []
    for lr in lrs:
        for k in ks:
            row = dict(lr=lr, k=k)
            for method in ESTIMATES:
                sel = [r for r in records if r['k'] == k and r['lr'] == lr and r['method'] == method]
                row[method] = (mean(r['e_mu'] for r in sel), mean(r['e_sigma'] for r in sel))
            summary.append(row)
    per_layer = {}
    for lr in lrs:
        for k in ks:
            for name in layer_names:
                for method in ESTIMATES:
                    sel = [r for r in records if r['k'] == k and r['lr'] == lr and
                           r['layer'] == name and r['method'] == method]
                    per_layer[(lr, k, name, method)] = (mean(r['e_mu'] for r in sel),
                                                        mean(r['e_sigma'] for r in sel))
    return summary, per_layer


def tables(summary, per_layer, ks, lrs, layer_names, final_loss):
    out = []
    header = ['lr', 'k'] + [f'e_μ {m}' for m in ESTIMATES] + [f'e_σ {m}' for m in ESTIMATES] + \
        ['Naive/CBN e_μ', 'Naive/CBN e_σ', 'final train loss']
    rows = []
    for row in summary:
        mu = [row[m][0] for m in ESTIMATES]
        sg = [row[m][1] for m in ESTIMATES]
        rows.append([row['lr'], row['k']] + [fmt(v) for v in mu] + [fmt(v) for v in sg] +
                    [f'{mu[1] / mu[0]:.1f}×' if mu[0] > 0 else '–',
                     f'{sg[1] / sg[0]:.1f}×' if sg[0] > 0 else '–',
                     f"{final_loss[(row['lr'], row['k'])]:.3f}"])
    out.append('Layer-averaged errors (mean over CBN layers and measurement points):\n\n' +
               markdown_table(header, rows))
    for lr in lrs:
        for k in ks:
            header = ['layer'] + [f'e_μ {m}' for m in ESTIMATES] + [f'e_σ {m}' for m in ESTIMATES]
            rows = [[name] + [fmt(per_layer[(lr, k, name, m)][0]) for m in ESTIMATES] +
                    [fmt(per_layer[(lr, k, name, m)][1]) for m in ESTIMATES] for name in layer_names]
            out.append(f'Per layer, lr={lr}, k={k} (mean over measurement points):\n\n' +
                       markdown_table(header, rows))
    return out


def plot(records, ks, lrs, layer_names, path_time, path_layers):
    pyplot = plt()
    colours = {k: c for k, c in zip(ks, ('tab:blue', 'tab:orange', 'tab:green', 'tab:red'))}
    fig, axes = pyplot.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7), squeeze=False)
    for col, lr in enumerate(lrs):
        for row, key in enumerate(('e_mu', 'e_sigma')):
            plot_errors(axes[row][col], [r for r in records if r['lr'] == lr], ks, PLOTTED_ESTIMATES, key,
                        colours)
            axes[row][col].set_title(f'lr={lr}: {"mean" if key == "e_mu" else "std"}, layer average')
    axes[0][0].legend(fontsize=7, ncol=3)
    save_figure(fig, path_time)

    fig, axes = pyplot.subplots(2, len(lrs), figsize=(5.5 * len(lrs), 7), squeeze=False)
    for col, lr in enumerate(lrs):
        for row, key in enumerate(('e_mu', 'e_sigma')):
            plot_errors(axes[row][col], [r for r in records if r['lr'] == lr], ks,
                        ('CBN', 'Naive CBN', 'Own-layer exact'), key, colours, layers=layer_names)
            axes[row][col].set_title(f'lr={lr}: {"e_μ" if key == "e_mu" else "e_σ"} per layer')
    axes[0][0].legend(fontsize=7, ncol=2)
    save_figure(fig, path_layers)


def main(argv=None):
    parser = analysis_parser(__doc__, quick='a few-second run (tests)')
    parser.add_argument('--ks', type=int, nargs='+', default=[2, 4, 8])
    parser.add_argument('--lrs', type=float, nargs='+', default=[0.02, 0.1])
    parser.add_argument('--iters', type=int, default=600)
    parser.add_argument('--burn-in', type=int, default=50, help='iterations with window 1 first')
    parser.add_argument('--every', type=int, default=25, help='measure every N iterations')
    parser.add_argument('--batch-size', type=int, default=4)
    parser.add_argument('--weight-decay', type=float, default=1e-4)
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--freeze-convs', action='store_true',
                        help='conv weights fixed (a check: CBN = Naive CBN, first layer exact)')
    args = parser.parse_args(argv)
    if args.quick:
        args.ks, args.iters, args.burn_in, args.every = args.ks[:2] if len(args.ks) > 1 else args.ks, \
            40, 5, 10
    torch.set_num_threads(args.threads)
    x_train, y_train, _, _ = load_digits_tensors(size=16)
    report = Report(args.out, 'statistics_estimation')
    records, final_loss = [], {}
    for lr in args.lrs:
        for k in args.ks:
            recs, loss = run(k, lr, args, (x_train, y_train))
            records += recs
            final_loss[(lr, k)] = loss
            print(f'[statistics_estimation] lr={lr} k={k}: {len(recs)} records, '
                  f'final train loss {loss:.3f} ({report.seconds:.0f} s)', flush=True)
    layer_names = list(dict.fromkeys(r['layer'] for r in records))
    summary, per_layer = summarise(records, args.ks, args.lrs, layer_names)
    text = tables(summary, per_layer, args.ks, args.lrs, layer_names, final_loss)
    command = ('.venv/bin/python tools/analysis/statistics_estimation.py ' +
               ' '.join(f'--{k.replace("_", "-")} {" ".join(map(str, v)) if isinstance(v, list) else v}'
                        for k, v in vars(args).items()
                        if k not in ('out', 'quick', 'freeze_convs', 'threads')) +
               f' --threads {args.threads}' + (' --freeze-convs' if args.freeze_convs else ''))
    md = (f'# Statistics estimation\n\nCommand: `{command}`\n\n'
          f'Wall time: {report.seconds:.0f} s\n\n' + '\n\n'.join(text) + '\n')
    report.write(md, dict(args=dict(vars(args)), records=records,
                          final_loss={f'lr={lr},k={k}': v for (lr, k), v in final_loss.items()}),
                 plot=lambda path: plot(records, args.ks, args.lrs, layer_names, path,
                                        report.path('_layers.png')))
    return records


if __name__ == '__main__':
    main()
