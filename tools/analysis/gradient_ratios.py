"""Do the statistics of layer l depend mostly on layer l's own weights? (The paper's Appendix C.)

For every CBN layer l of two small CBN networks trained on scikit-learn's digits, the ratios
‖∂μ^l/∂θ^r‖_F / ‖∂μ^l/∂θ^l‖_F and the same for ν^l = E[x²], r ∈ {l−1, l−2}. Design: docs/analysis.md.

    .venv/bin/python tools/analysis/gradient_ratios.py             # full, a few minutes
    .venv/bin/python tools/analysis/gradient_ratios.py --quick     # seconds (tests)

Prints the tables; writes ``gradient_ratios.{md,json,png}`` to ``--out``.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import (Report, VGGNet, analysis_parser, cbn_layers, load_digits_tensors, markdown_table,
                    norm_factory, plt, save_figure, set_active_window)

#: The paper's Appendix C numbers (ratio for μ, ratio for ν), ImageNet-trained networks.
PAPER = {'ResNet (paper)': (0.12, 0.39), 'VGG-16 (paper)': (0.20, 0.41),
         'Inception-v3 (paper)': (0.15, 0.37)}
KEYS = ('mu_l-1', 'mu_l-2', 'nu_l-1', 'nu_l-2')


class MMDetResNetClassifier(nn.Module):
    """mmdet's ResNet backbone (from the registry) + global average pool + linear classifier."""

    def __init__(self, depth=18, base_channels=16, window=4, num_classes=10):
        super().__init__()
        from mmdet.registry import MODELS
        from mmdet.utils import register_all_modules
        register_all_modules(init_default_scope=False)
        self.backbone = MODELS.build(dict(
            type='ResNet', depth=depth, base_channels=base_channels, in_channels=1,
            out_indices=(3, ), norm_cfg=dict(type='CBN', window=window), norm_eval=False,
            zero_init_residual=False))
        from mmengine.logging import MMLogger
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel('WARNING')  # init_weights logs every parameter at INFO
        try:
            self.backbone.init_weights()
        finally:
            logger.setLevel(level)
        self.fc = nn.Linear(base_channels * 8, num_classes)

    def forward(self, x):
        return self.fc(self.backbone(x)[-1].mean(dim=(2, 3)))


def build(arch, window):
    if arch == 'resnet18':
        return MMDetResNetClassifier(window=window), 64
    if arch == 'vgg':
        return VGGNet(norm_factory('CBN', window=window)), 32
    raise ValueError(f"unknown arch {arch!r}; allowed: 'resnet18', 'vgg'")


def jacobian_norms(stat, weights):
    """``[‖∂stat/∂w‖_F for w in weights]`` with a batched backward (one row per channel of ``stat``)."""
    eye = torch.eye(stat.numel(), dtype=stat.dtype)
    try:
        grads = torch.autograd.grad(stat, weights, grad_outputs=eye, is_grads_batched=True,
                                    retain_graph=True, allow_unused=True)
    except RuntimeError:  # an op without a batching rule: one backward per channel
        sums = [0.0] * len(weights)
        for c in range(stat.numel()):
            gs = torch.autograd.grad(stat[c], weights, retain_graph=True, allow_unused=True)
            sums = [s + (0.0 if g is None else float((g.double() ** 2).sum())) for s, g in zip(sums, gs)]
        return [s ** 0.5 for s in sums]
    return [0.0 if g is None else float(g.double().pow(2).sum().sqrt()) for g in grads]


def measure(model, x):
    """Per CBN layer: ``{key: ratio}`` for the keys in :data:`KEYS` (see the module docstring)."""
    net = copy.deepcopy(model).train()
    set_active_window(net, 1)  # BN semantics: batch statistics, gradients through them
    convs = [m for m in net.modules() if isinstance(m, nn.Conv2d)]
    order, outputs, inputs, handles = [], {}, {}, []
    def on_conv(mod, inp, out):  # must return None (a value would replace the output)
        order.append(mod)
        outputs[id(out)] = mod

    for conv in convs:
        handles.append(conv.register_forward_hook(on_conv))
    for name, layer in cbn_layers(net).items():
        handles.append(layer.register_forward_pre_hook(
            lambda mod, inp, name=name: inputs.__setitem__(name, inp[0])))
    net(x)
    for h in handles:
        h.remove()
    results = {}
    for name, act in inputs.items():
        conv = outputs.get(id(act))
        if conv is None:
            continue
        mu = act.mean(dim=(0, 2, 3))
        nu = (act * act).mean(dim=(0, 2, 3))
        position = order.index(conv)
        earlier = order[:position][::-1]
        grads = torch.autograd.grad(mu.sum(), [c.weight for c in earlier], retain_graph=True,
                                    allow_unused=True) if earlier else []
        upstream = [c for c, g in zip(earlier, grads) if g is not None][:2]  # in the graph of μ^l
        if not upstream:
            continue
        weights = [conv.weight] + [c.weight for c in upstream]
        n_mu = jacobian_norms(mu, weights)
        n_nu = jacobian_norms(nu, weights)
        row = {}
        for i, r in enumerate(('l-1', 'l-2')[:len(upstream)]):
            row[f'mu_{r}'] = n_mu[i + 1] / n_mu[0]
            row[f'nu_{r}'] = n_nu[i + 1] / n_nu[0]
        results[name] = row
    return results


def average(per_layer):
    out = {}
    for key in KEYS:
        values = [row[key] for row in per_layer.values() if key in row]
        out[key] = sum(values) / len(values) if values else float('nan')
        out[f'n_{key}'] = len(values)
    return out


def run(arch, args, data):
    x_train, y_train = data
    torch.manual_seed(args.seed)
    model, size = build(arch, args.window)
    x_train = F.interpolate(x_train, size=(size, size), mode='bilinear', align_corners=False)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    points = sorted({round(i * args.iters / (args.points - 1)) for i in range(args.points)})
    records = []
    for it in range(args.iters + 1):
        idx = torch.randint(len(y_train), (args.batch_size, ), generator=gen)
        x, y = x_train[idx], y_train[idx]
        if it in points:
            per_layer = measure(model, x)
            records.append(dict(arch=arch, iter=it, per_layer=per_layer, mean=average(per_layer)))
            m = records[-1]['mean']
            print(f'[gradient_ratios] {arch} iter {it}: ' +
                  ', '.join(f'{k} {m[k]:.3f}' for k in KEYS), flush=True)
        if it == args.iters:
            break
        set_active_window(model, 1 if it < args.burn_in else args.window)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return records


def plot(path, records, archs):
    """The layer-averaged ratios over the iterations (μ left, ν right), with the paper's as lines."""
    pyplot = plt()
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 4))
    colours = dict(zip(archs, ('tab:blue', 'tab:orange', 'tab:green')))
    for ax, stat in zip(axes, ('mu', 'nu')):
        for arch in archs:
            its = [r['iter'] for r in records if r['arch'] == arch]
            for r_key, style in (('l-1', '-o'), ('l-2', '--s')):
                ax.plot(its, [r['mean'][f'{stat}_{r_key}'] for r in records if r['arch'] == arch],
                        style, color=colours[arch], label=f'{arch}, r={r_key}')
        for (name, vals), marker in zip(PAPER.items(), ('x', '+', '*')):
            ax.axhline(vals[0 if stat == 'mu' else 1], color='grey', lw=0.8, ls=':')
            ax.annotate(name, (0, vals[0 if stat == 'mu' else 1]), fontsize=7, color='grey')
        ax.set_xlabel('iteration')
        ax.set_ylabel(f'‖∂{"μ" if stat == "mu" else "ν"}^l/∂θ^r‖ / ‖∂{"μ" if stat == "mu" else "ν"}^l/∂θ^l‖')
        ax.set_title(f'{"mean μ" if stat == "mu" else "second moment ν"}: layer average')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None):
    parser = analysis_parser(__doc__, quick='a few-second run (tests)')
    parser.add_argument('--archs', nargs='+', default=['resnet18', 'vgg'])
    parser.add_argument('--iters', type=int, default=600)
    parser.add_argument('--points', type=int, default=4, help='measurement points, 0 .. iters')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--lr', type=float, default=0.05)
    parser.add_argument('--window', type=int, default=4)
    parser.add_argument('--burn-in', type=int, default=20)
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.points, args.burn_in, args.batch_size = 2, 2, 1, 4
    torch.set_num_threads(args.threads)
    x_train, y_train, _, _ = load_digits_tensors(size=8)
    report = Report(args.out, 'gradient_ratios')
    records = []
    for arch in args.archs:
        records += run(arch, args, (x_train, y_train))

    header = ['model', 'iteration', 'μ: r=l−1', 'μ: r=l−2', 'ν: r=l−1', 'ν: r=l−2', 'layers']
    rows = [[r['arch'], r['iter']] + [f"{r['mean'][k]:.3f}" for k in KEYS] +
            [r['mean']['n_mu_l-1']] for r in records]
    rows += [[name, 'end of ImageNet training?', f'{mu:.2f}', '–', f'{nu:.2f}', '–', '–']
             for name, (mu, nu) in PAPER.items()]
    text = ['Ratios averaged over CBN layers (ours: this run; last rows: the paper\'s Appendix C '
            'numbers, which it gives without saying which r or epoch):\n\n' + markdown_table(header, rows)]
    for arch in args.archs:
        last = [r for r in records if r['arch'] == arch][-1]
        header = ['layer', 'μ: r=l−1', 'μ: r=l−2', 'ν: r=l−1', 'ν: r=l−2']
        lrows = [[name] + [f"{row[k]:.3f}" if k in row else '–' for k in KEYS]
                 for name, row in last['per_layer'].items()]
        text.append(f"Per layer, {arch}, iteration {last['iter']}:\n\n" + markdown_table(header, lrows))
    command = (f'.venv/bin/python tools/analysis/gradient_ratios.py --archs {" ".join(args.archs)} '
               f'--iters {args.iters} --points {args.points} --batch-size {args.batch_size} '
               f'--lr {args.lr} --window {args.window} --burn-in {args.burn_in} --seed {args.seed}')
    md = (f'# Gradient ratios (Appendix C)\n\nCommand: `{command}`\n\n'
          f'Wall time: {report.seconds:.0f} s\n\n' + '\n\n'.join(text) + '\n')
    report.write(md, dict(args=vars(args), records=records, paper=PAPER),
                 plot=lambda path: plot(path, records, args.archs))
    return records


if __name__ == '__main__':
    main()
