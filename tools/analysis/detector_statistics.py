"""How well CBN, Naive CBN and BN estimate the window statistics of a detector's CBN layers in training.

Trains the demo Faster R-CNN with CBN(k) in the FPN and the box head and, every few iterations, compares
each CBN layer's estimates with oracles recomputed under the current weights. Design: docs/analysis.md.

    OMP_NUM_THREADS=1 .venv/bin/python tools/analysis/detector_statistics.py --ks 2 4 8   # 1.5 min per k
    .venv/bin/python tools/analysis/detector_statistics.py --quick     # tiny data, seconds (tests)

Prints the tables; writes ``detector_statistics.{md,json,png}`` to ``--out`` (``--quick``: the work dir).
"""
import copy
import math
import os
import os.path as osp
import time
from collections import deque

import torch
from mmengine.model import is_model_wrapper
from torch.nn.modules.batchnorm import _BatchNorm

from cbn_mmdet.models import CrossIterationBatchNorm2d
from cbn_mmdet.ops.statistics import batch_moments, window_moments
from common import (ESTIMATES, PLOTTED_ESTIMATES, REPO_ROOT, Report, TrainingLosses, demo_detector_config,
                    detector_parser, ensure_dir, errors, fmt, markdown_table, mean, plot_errors, plt,
                    resolve_detector_args, save_figure)

ORACLES = ('fixed', 'batch-BN')  # backbone BN fixed at the current batch's statistics / per batch
LAYER_TYPES = ('FPN lateral', 'FPN output', 'box head conv')
ITERS, QUICK_ITERS = 400, 16  # default --iters, without and with --quick


def layer_type(name):
    if '.lateral_convs.' in name:
        return 'FPN lateral'
    if '.fpn_convs.' in name:
        return 'FPN output'
    if '.shared_convs.' in name:
        return 'box head conv'
    return 'other'


def short_name(name):
    """``neck.lateral_convs.0.bn`` -> ``lateral 0``; ``roi_head.bbox_head.shared_convs.2.bn`` -> ``head conv 2``."""
    parts = name.split('.')
    kind = {'lateral_convs': 'lateral', 'fpn_convs': 'fpn out', 'shared_convs': 'head conv'}
    for i, p in enumerate(parts):
        if p in kind and i + 1 < len(parts):
            return f'{kind[p]} {parts[i + 1]}'
    return name


# ------------------------------------------------------------------------------------------ config
def build_config(k, args, work_dir):
    """The demo config with CBN(window=k) in FPN + box head, the short schedule, no evaluation."""
    # momentum 1, running_stats='window': the running statistics are the window statistics just used
    cbn = dict(type='CBN', window=k, requires_grad=True, momentum=1.0, running_stats='window')
    cfg = demo_detector_config(cbn, burn_in=args.burn_in, iters=args.iters, warmup=args.warmup, lr=args.lr,
                               seed=args.seed, batch_size=args.batch_size, data_root=args.data_root,
                               generation=args.generation, few_rois=args.quick, evaluate=False)
    cfg.work_dir = work_dir
    cfg.experiment_name = f'detector_statistics_k{k}_{os.getpid()}_{time.time_ns()}'
    return cfg


# ------------------------------------------------------------------------------------------ maths
def pool(moments):
    """Pool per-iteration ``(mean, var)`` with weight 1/k each (Eq. 9-11's weighting), in float64."""
    means = torch.stack([m.double() for m, _ in moments])
    vars_ = torch.stack([v.double() for _, v in moments])
    valid = torch.ones(len(moments) - 1, dtype=torch.float64)
    mean, var, _ = window_moments(means[-1], vars_[-1], means[:-1], vars_[:-1], valid)
    return mean, var


def window_statistics(layer, layer_input):
    """After ``layer``'s training forward on ``layer_input``: ``{'CBN', 'Naive CBN', 'BN': (mean, var)}``
    (float64), the window size used and the largest difference of the CBN statistics from the running
    statistics. ``None`` if the layer used no past iteration."""
    past = layer.past_window()
    if past is None:
        return None
    valid = past['valid'].double()
    batch_mean, batch_var = (t.double() for t in batch_moments(layer_input.detach()))
    cbn_mean, cbn_var, k_used = window_moments(batch_mean, batch_var, past['mean_compensated'].double(),
                                               past['var_compensated'].double(), valid)
    naive_mean, naive_var, _ = window_moments(batch_mean, batch_var, past['mean'].double(),
                                              past['var'].double(), valid)
    count = layer_input.shape[0] * layer_input.shape[2] * layer_input.shape[3]
    n = count + past['count'].double()
    running_var = layer.running_var.double() * (n - 1) / n  # momentum=1: σ̄²·n/(n−1)
    std = cbn_var.clamp_min(1e-12).sqrt()
    check = max(float(((layer.running_mean.double() - cbn_mean).abs() / std).max()),
                float(((running_var - cbn_var).abs() / cbn_var.clamp_min(1e-12)).max()))
    return dict(stats={'CBN': (cbn_mean, cbn_var), 'Naive CBN': (naive_mean, naive_var),
                       'BN': (batch_mean, batch_var)}, k=int(k_used), used_vs_running=check)


# ------------------------------------------------------------------------------------------ the hook
class DetectorStatisticsStudy(TrainingLosses):
    """Keeps the last k iterations' inputs; measures before the optimizer step (weights θ_t).

    Args:
        k: the CBN window.
        burn_in: iterations with window 1 (``CBNBurnInHook``).
        interval: measure every ``interval`` iterations once the window is full.
        own_layer: also measure the own-layer-exact diagnostic (keeps every conv input of k iterations).
        batch_bn_oracle: also measure against oracle B (backbone BN per batch).
    """
    priority = 'LOWEST'  # after CBNBurnInHook has set the window of this iteration

    def __init__(self, k, burn_in, interval, own_layer=True, batch_bn_oracle=True):
        super().__init__()
        self.k, self.interval, self.own_layer, self.batch_bn_oracle = k, interval, own_layer, batch_bn_oracle
        self.records, self.checks = [], []
        self.kept = deque(maxlen=k)  # per iteration: images, rois, conv inputs (oldest first)
        self.start = burn_in + k - 1  # first iteration with k − 1 past entries
        self.current = None
        self.measuring = False
        self.iter = -1

    # -------------------------------------------------------------- set-up
    def before_train(self, runner):
        model = runner.model.module if is_model_wrapper(runner.model) else runner.model
        self.model = model
        self.oracle = copy.deepcopy(model)  # before any hook of ours is registered
        for m in self.oracle.modules():
            for hooks in ('_forward_hooks', '_forward_pre_hooks', '_backward_hooks',
                          '_forward_hooks_with_kwargs', '_forward_pre_hooks_with_kwargs'):
                if hasattr(m, hooks):
                    getattr(m, hooks).clear()
        self.oracle.eval()
        self.cbn = {n: m for n, m in model.named_modules() if isinstance(m, CrossIterationBatchNorm2d)}
        self.bn = {n: m for n, m in model.named_modules()
                   if isinstance(m, _BatchNorm) and n not in self.cbn}
        if not all(n.startswith('backbone.') for n in self.bn):
            raise RuntimeError(f'plain BN outside the backbone: {sorted(self.bn)}')
        if not self.cbn:
            raise RuntimeError('no CBN layer in the model')
        modules = dict(model.named_modules())
        self.convs = {}
        for name in self.cbn:
            parent = modules[name.rsplit('.', 1)[0]]
            conv = getattr(parent, 'conv', None)
            if not isinstance(conv, torch.nn.Conv2d):
                raise RuntimeError(f'{name}: not the norm of a ConvModule')
            self.convs[name] = conv
        model.backbone.register_forward_pre_hook(self._on_images)
        model.roi_head.bbox_roi_extractor.register_forward_pre_hook(self._on_rois)
        for name, layer in self.cbn.items():
            layer.register_forward_hook(
                lambda mod, inp, out, name=name: self._on_cbn(name, mod, inp[0]))
            if self.own_layer:
                self.convs[name].register_forward_pre_hook(
                    lambda mod, inp, name=name: self._on_conv_input(name, inp[0]))
        for name, layer in self.bn.items():
            layer.register_forward_pre_hook(lambda mod, inp, name=name: self._on_bn(name, inp[0]))
        runner.optim_wrapper.optimizer.register_step_pre_hook(self._before_step)
        self.runner = runner

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        self.iter = runner.iter
        self.measuring = (runner.iter >= self.start and
                          (runner.iter - self.start) % self.interval == 0)
        self.current = dict(images=None, rois=None, conv_inputs={}, stats={}, calls={}, bn={})

    # -------------------------------------------------------------- recorders (training forward)
    def _on_images(self, module, inputs):
        self.current['images'] = inputs[0].detach().clone()

    def _on_rois(self, module, inputs):
        self.current['rois'] = inputs[1].detach().clone()

    def _on_conv_input(self, name, x):
        self.current['conv_inputs'][name] = x.detach().clone()

    def _on_cbn(self, name, layer, x):
        if not layer.training:
            return
        self.current['calls'][name] = self.current['calls'].get(name, 0) + 1
        if self.measuring:
            self.current['stats'][name] = window_statistics(layer, x)

    def _on_bn(self, name, x):
        if self.measuring and self.bn[name].training:
            self.current['bn'][name] = batch_moments(x.detach())

    # -------------------------------------------------------------- measurement
    def _before_step(self, optimizer, a, kw):
        cur = self.current
        if cur is None or cur['images'] is None:
            return
        self.kept.append(dict(images=cur['images'], rois=cur['rois'],
                              conv_inputs=cur['conv_inputs']))
        if self.measuring:
            self._measure(cur)
        self.current = None

    @torch.no_grad()
    def _measure(self, cur):
        stats = cur['stats']
        if set(cur['calls']) != set(self.cbn) or any(c != 1 for c in cur['calls'].values()):
            raise RuntimeError(f'each CBN layer must run once per iteration, got {cur["calls"]}')
        if len(self.kept) < self.k or any(s is None or s['k'] != self.k for s in stats.values()):
            print(f'[detector_statistics] iteration {self.iter}: window not full, skipped', flush=True)
            return
        if not all(self.cbn[name].history_open for name in stats):
            raise RuntimeError('a CBN layer has no open history entry for this iteration')
        if set(cur['bn']) != set(self.bn):
            raise RuntimeError('a backbone BN layer did not run in this iteration')
        oracles = {'fixed': self._oracle(stats, cur['bn'], batch_bn=False)}
        if self.batch_bn_oracle:
            oracles['batch-BN'] = self._oracle(stats, cur['bn'], batch_bn=True)
        own = self._own_layer() if self.own_layer else {}
        lr = float(self.runner.optim_wrapper.get_lr()['lr'][0])
        check = dict(k=self.k, iter=self.iter, lr=lr, rois=[int(e['rois'].shape[0]) for e in self.kept],
                     used_vs_running=max(s['used_vs_running'] for s in stats.values()))
        for oname, (pooled, newest) in oracles.items():
            worst = 0.0
            for li, (name, s) in enumerate(stats.items()):
                o_mean, o_var = pooled[name]
                methods = dict(s['stats'])
                if name in own:
                    methods['Own-layer exact'] = own[name]
                for method in ESTIMATES:
                    if method not in methods:
                        continue
                    m, v = methods[method]
                    e_mu, e_sigma = errors(m, v, o_mean, o_var)
                    self.records.append(dict(k=self.k, iter=self.iter, lr=lr, oracle=oname, layer=name,
                                             layer_index=li, layer_type=layer_type(name),
                                             method=method, e_mu=e_mu, e_sigma=e_sigma))
                # the oracle's newest batch is the training forward of this iteration
                b_mean, b_var = s['stats']['BN']
                n_mean, n_var = newest[name]
                b_std = b_var.clamp_min(1e-12).sqrt()
                worst = max(worst, float(((n_mean - b_mean).abs() / b_std).max()),
                            float(((n_var.clamp_min(0).sqrt() - b_std).abs() / b_std).max()))
            check[f'current_batch_{oname}'] = worst
        if 'batch-BN' in oracles:  # how far apart the two oracle definitions are (B against A)
            gaps = [errors(*oracles['batch-BN'][0][name], *oracles['fixed'][0][name]) for name in stats]
            check['oracle_gap'] = dict(e_mu=mean(g[0] for g in gaps), e_sigma=mean(g[1] for g in gaps))
        self.checks.append(check)

    def _load_oracle(self, stats, bn_stats, batch_bn):
        """θ_t into the copy; every norm layer's fixed statistics as its running statistics."""
        params = dict(self.model.named_parameters())
        buffers = dict(self.model.named_buffers())
        for n, p in self.oracle.named_parameters():
            p.copy_(params[n])
        for n, b in self.oracle.named_buffers():
            b.copy_(buffers[n])
        modules = dict(self.oracle.named_modules())
        for name, s in stats.items():
            mean, var = s['stats']['CBN']
            modules[name].running_mean.copy_(mean)
            modules[name].running_var.copy_(var)  # biased σ̄²: eval BN divides by sqrt(var + eps)
        for name, (mean, var) in bn_stats.items():
            modules[name].running_mean.copy_(mean)
            modules[name].running_var.copy_(var)
        self.oracle.eval()
        if batch_bn:  # backbone BN normalises each batch with its own statistics
            for name in bn_stats:
                modules[name].train()
                modules[name].momentum = 0.0  # running statistics untouched
        return modules

    def _oracle(self, stats, bn_stats, batch_bn):
        """``(pooled {name: (μ*, σ*²)}, newest batch {name: (μ, var)})`` over the k kept batches."""
        modules = self._load_oracle(stats, bn_stats, batch_bn)
        per_batch = {name: [] for name in stats}
        handles = [modules[name].register_forward_pre_hook(
            lambda mod, inp, name=name: per_batch[name].append(batch_moments(inp[0])))
            for name in stats]
        net = self.oracle
        extractor = net.roi_head.bbox_roi_extractor
        try:
            for entry in self.kept:  # oldest first, the current iteration last
                feats = net.neck(net.backbone(entry['images']))
                bbox_feats = extractor(feats[:extractor.num_inputs], entry['rois'])
                net.roi_head.bbox_head(bbox_feats)
        finally:
            for h in handles:
                h.remove()
        for name, values in per_batch.items():
            if len(values) != len(self.kept):
                raise RuntimeError(f'{name}: {len(values)} oracle calls for {len(self.kept)} batches')
        pooled = {name: pool(values) for name, values in per_batch.items()}
        newest = {name: (values[-1][0].double(), values[-1][1].double())
                  for name, values in per_batch.items()}
        return pooled, newest

    def _own_layer(self):
        out = {}
        for name, conv in self.convs.items():
            # _conv_forward: the conv at θ_t without its forward hooks (they record training inputs)
            moments = [batch_moments(conv._conv_forward(e['conv_inputs'][name], conv.weight, conv.bias))
                       for e in self.kept]
            out[name] = pool(moments)
        return out


def run(k, args):
    """Train one detector with CBN(window=k); returns ``(records, checks, final loss, seconds)``."""
    from mmengine.runner import Runner
    work_dir = ensure_dir(osp.join(args.work_dir, f'k{k}'))
    cfg = build_config(k, args, work_dir)
    runner = Runner.from_cfg(cfg)
    study = DetectorStatisticsStudy(k, args.burn_in, args.interval, own_layer=args.own_layer,
                                    batch_bn_oracle=args.batch_bn_oracle)
    runner.register_hook(study)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    return study.records, study.checks, mean(study.losses[-50:]), seconds


# ------------------------------------------------------------------------------------------ output
def select(records, **where):
    return [r for r in records if all(r[key] == value for key, value in where.items())]


def averages(records):
    return dict(e_mu=mean(r['e_mu'] for r in records), e_sigma=mean(r['e_sigma'] for r in records),
                n=len(records))


def summarise(records, ks, layer_names, full_lr_below):
    """Means of the records: ``{oracle: {k: {method: {e_mu, e_sigma, n}}}}``, by layer type, per layer,
    and at the full learning rate only (iterations before the first step of the schedule)."""
    out = dict(overall={}, full_lr={}, by_type={}, per_layer={})
    for oracle in ORACLES:
        for key in out:
            out[key][oracle] = {}
        for k in ks:
            sel = select(records, oracle=oracle, k=k)
            if not sel:
                continue
            methods = [m for m in ESTIMATES if select(sel, method=m)]
            out['overall'][oracle][str(k)] = {m: averages(select(sel, method=m)) for m in methods}
            out['full_lr'][oracle][str(k)] = {
                m: averages([r for r in select(sel, method=m) if r['iter'] < full_lr_below])
                for m in methods}
            out['by_type'][oracle][str(k)] = {
                t: {m: averages(select(sel, method=m, layer_type=t)) for m in methods}
                for t in LAYER_TYPES if select(sel, layer_type=t)}
            out['per_layer'][oracle][str(k)] = {
                name: {m: averages(select(sel, method=m, layer=name)) for m in methods}
                for name in layer_names if select(sel, layer=name)}
    return out


def ratio(a, b):
    return f'{a / b:.2f}×' if b > 0 and math.isfinite(a) and math.isfinite(b) else '–'


ORACLE_TITLES = {
    'fixed': 'Oracle A (the definition above: backbone BN fixed at the current batch\'s statistics)',
    'batch-BN': 'Oracle B (backbone BN normalises each batch with its own statistics)',
}


def tables(summary, ks, final_loss, n_layers, args):
    out = []
    methods = [m for m in ESTIMATES if any(m in summary['overall']['fixed'].get(str(k), {}) for k in ks)]

    def cells(row):
        mu = [row[m]['e_mu'] for m in methods]
        sg = [row[m]['e_sigma'] for m in methods]
        return [fmt(v) for v in mu] + [fmt(v) for v in sg] + [ratio(mu[1], mu[0]), ratio(sg[1], sg[0])]

    def overall_rows(block, with_loss):
        rows = []
        for k in ks:
            row = block.get(str(k))
            if row:
                points = row['CBN']['n'] // n_layers
                rows.append([k, points] + cells(row) + ([f'{final_loss[k]:.3f}'] if with_loss else []))
        return rows

    metric_header = ([f'e_μ {m}' for m in methods] + [f'e_σ {m}' for m in methods] +
                     ['Naive/CBN e_μ', 'Naive/CBN e_σ'])
    first = int(args.iters * 0.75)
    for oracle in ORACLES:
        if not summary['overall'].get(oracle):
            continue
        title = ORACLE_TITLES[oracle]
        out.append(f'## {title}\n\nLayer-averaged errors (mean over the {n_layers} CBN layers and the '
                   'measurement points):\n\n' +
                   markdown_table(['k', 'points'] + metric_header + ['final train loss'],
                                  overall_rows(summary['overall'][oracle], True)))
        out.append(f'At the full learning rate only (measurement points before iteration {first}, the '
                   'first ×0.1 step):\n\n' +
                   markdown_table(['k', 'points'] + metric_header,
                                  overall_rows(summary['full_lr'][oracle], False)))
        rows = [[k, t] + cells(row) for k in ks
                for t, row in summary['by_type'][oracle].get(str(k), {}).items()]
        letter = 'A' if oracle == 'fixed' else 'B'
        out.append(f'By layer type, oracle {letter} (mean over the 4 layers of the type and the '
                   'measurement points):\n\n' + markdown_table(['k', 'layers'] + metric_header, rows))
        for k in ks:
            per = summary['per_layer'][oracle].get(str(k), {})
            rows = [[f'{short_name(name)} (`{name}`)'] + cells(row) for name, row in per.items()]
            out.append(f'Per layer, k = {k}, oracle {letter} (mean over measurement points):\n\n' +
                       markdown_table(['layer'] + metric_header, rows))
    return out


def plot(records, ks, layer_names, path):
    """Errors over training (layer average) and per layer, for oracle A and oracle B (columns)."""
    pyplot = plt()
    colours = {k: c for k, c in zip(sorted(ks), ('tab:blue', 'tab:orange', 'tab:green', 'tab:red'))}
    oracles = [o for o in ORACLES if select(records, oracle=o)]
    fig, axes = pyplot.subplots(2, 2 * len(oracles), figsize=(6 * 2 * len(oracles), 7.5), squeeze=False)
    for col, oracle in enumerate(oracles):
        sel = select(records, oracle=oracle)
        tag = 'oracle A' if oracle == 'fixed' else 'oracle B'
        for row, key in enumerate(('e_mu', 'e_sigma')):
            ax = axes[row][col]
            plot_errors(ax, sel, ks, PLOTTED_ESTIMATES, key, colours)
            ax.set_title(f'{tag}: {"mean" if key == "e_mu" else "std"}, average of {len(layer_names)} layers')
            ax = axes[row][len(oracles) + col]
            plot_errors(ax, sel, ks, PLOTTED_ESTIMATES, key, colours, layers=layer_names,
                        tick_labels=[short_name(n) for n in layer_names])
            ax.set_title(f'{tag}: {"e_μ" if key == "e_mu" else "e_σ"} per layer')
    axes[0][0].legend(fontsize=7, ncol=3)
    fig.suptitle('Faster R-CNN (demo), CBN in FPN + box head: window statistics vs the oracle '
                 '(A: backbone BN fixed at the current batch; B: backbone BN per batch)')
    save_figure(fig, path, dpi=100)


def main(argv=None):
    parser = detector_parser(__doc__, 'detector_statistics', ITERS,
                             work_dir='mmengine work directories WORK_DIR/k<k>/',
                             quick='tiny data (8 images of 64 px), 16 iterations, burn-in 4 (tests)')
    parser.add_argument('--ks', type=int, nargs='+', default=[4], help='CBN windows, one run each')
    parser.add_argument('--interval', type=int, default=None, help='measure every N iterations (10)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--no-own-layer', dest='own_layer', action='store_false',
                        help='skip the own-layer-exact diagnostic (keeps every conv input of k iterations)')
    parser.add_argument('--no-batch-bn-oracle', dest='batch_bn_oracle', action='store_false',
                        help='skip the oracle variant with per-batch backbone BN')
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.ks):
        parser.error('--ks: windows must be >= 2 (k = 1 is BN)')
    if args.quick:
        args.burn_in = 4 if args.burn_in is None else args.burn_in
        args.interval = args.interval or 3
    else:
        args.interval = args.interval or 10
    resolve_detector_args(args, 'detector_statistics', ITERS, QUICK_ITERS)
    torch.set_num_threads(args.threads)

    from cbn_mmdet_demo.shapes import make_demo_dataset
    make_demo_dataset(args.data_root, **args.generation)

    # the study at 2 images keeps its name; other batch sizes are written beside it
    report = Report(args.out, 'detector_statistics' + ('' if args.batch_size == 2 or args.quick
                                                       else f'_bs{args.batch_size}'))
    records, checks, final_loss, seconds = [], [], {}, {}
    for k in args.ks:
        recs, chks, loss, secs = run(k, args)
        records += recs
        checks += chks
        final_loss[k], seconds[k] = loss, secs
        worst = max([c['current_batch_fixed'] for c in chks], default=float('nan'))
        print(f'[detector_statistics] k={k}: {len(chks)} measurement points, final train loss {loss:.3f}, '
              f'{secs:.0f} s; current-batch check {worst:.2e}', flush=True)
    layer_names = list(dict.fromkeys(r['layer'] for r in records))
    summary = summarise(records, args.ks, layer_names, int(args.iters * 0.75))
    text = tables(summary, args.ks, final_loss, len(layer_names), args)
    wall = report.seconds
    command = ('OMP_NUM_THREADS=1 .venv/bin/python tools/analysis/detector_statistics.py' +
               (' --quick' if args.quick else '') + f' --ks {" ".join(map(str, args.ks))}'
               f' --iters {args.iters} --burn-in {args.burn_in} --warmup {args.warmup}'
               f' --interval {args.interval} --batch-size {args.batch_size} --lr {args.lr:g}'
               f' --seed {args.seed}' + ('' if args.own_layer else ' --no-own-layer') +
               ('' if args.batch_bn_oracle else ' --no-batch-bn-oracle'))
    gen = args.generation
    check_text = (f"Checks (largest over all points): oracle vs training forward on the current batch "
                  f"{max(c['current_batch_fixed'] for c in checks):.1e} (in batch-std units); CBN "
                  f"statistics vs the layer's running statistics "
                  f"{max(c['used_vs_running'] for c in checks):.1e}." if checks else
                  'No measurement point (window never full).')
    gaps = [c for c in checks if 'oracle_gap' in c]
    if gaps:
        check_text += ('\n\nDistance between the two oracles (oracle B measured against oracle A, '
                       'layer-averaged, mean over points): ' + ', '.join(
                           f"k={k}: e_μ {fmt(mean(c['oracle_gap']['e_mu'] for c in gaps if c['k'] == k))}, "
                           f"e_σ {fmt(mean(c['oracle_gap']['e_sigma'] for c in gaps if c['k'] == k))}"
                           for k in args.ks) + '.')
    md = (f'# Window statistics in the demo detector\n\nCommand: `{command}`\n\n'
          f"Data: demo shapes, {gen['num_train']} train images of {gen['image_size']} px "
          f"(`{osp.relpath(args.data_root, REPO_ROOT)}`). Model: "
          '`configs/demo/faster-rcnn_r18_fpn_demo-shapes.py` from scratch, CBN(k) in the FPN (4 lateral + 4 '
          'output convs) and the box head (4 convs), backbone BN. '
          f'{args.iters} iterations of {args.batch_size} images, lr {args.lr:g} (warm-up {args.warmup}, ×0.1 '
          f'at {int(args.iters * 0.75)} and {int(args.iters * 0.9)}), window 1 for {args.burn_in} '
          f'iterations, then k; measured every {args.interval} iterations from iteration burn-in + k − 1.\n\n'
          f"Wall time: {wall:.0f} s ({', '.join(f'k={k}: {seconds[k]:.0f} s' for k in args.ks)} of "
          f'training with the measurements), {args.threads} thread(s).\n\n' + check_text + '\n\n' +
          '\n\n'.join(text) + '\n')
    report.write(md, dict(args=vars(args), summary=summary, records=records, checks=checks,
                          final_loss={str(k): v for k, v in final_loss.items()},
                          seconds={str(k): v for k, v in seconds.items()}, wall_seconds=wall),
                 plot=(lambda path: plot(records, args.ks, layer_names, path)) if records else None)
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
