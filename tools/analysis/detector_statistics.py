"""How well do CBN, Naive CBN and BN estimate the window statistics in a real detector during training?
(Issue "Evidence that compensation works", item 1, the detector part; the classifier part is
``statistics_estimation.py``.)

The detector is the demo's (``configs/demo/faster-rcnn_r18_fpn_demo-shapes.py``): Faster R-CNN with a
half-width ResNet-18 (base width 32, BN, trained) + FPN (64 channels) + ``Shared4Conv1FCBBoxHead``,
with CBN (``window=k``, compensation on) in the FPN's 4 lateral and 4 output convs and in the box head's
4 shared convs (12 CBN layers), trained **from scratch** on the generated demo shapes data with
mmengine's ``Runner``. Schedule as in ``detection_analog.py``: ``--batch-size`` images per iteration (2),
``--iters`` iterations (400), SGD (momentum 0.9, weight decay 1e-4, gradient clipping 35), learning
rate 0.04 · sqrt(batch size / 8) (0.02 at 2 images), linear warm-up over iters // 8, ×0.1 at 75 % and
90 %; ``CBNBurnInHook``: window 1 for the first ``--burn-in`` iterations (100), then ``k``. The only
change to the CBN layers: ``momentum=1.0, running_stats='window'``, so that after each training forward
the running statistics *are* the window statistics used (read back as a check; running statistics do
not enter training, and nothing is evaluated here).

Every ``--interval`` iterations once the window is full (k − 1 past iterations recorded with window
k), for every CBN layer ``l``, right after the training forward and backward and **before** the
optimizer step (weights still θ_t), the script compares in the same run:

* **CBN**: μ̄, σ̄² that CBN normalised with: Eqs. 9-11 over the current batch and the compensated past
  (``window_moments(batch, past_window()['*_compensated'])``; checked against the running statistics).
* **Naive CBN**: the same with the recorded (uncompensated) past statistics.
* **BN**: the current mini-batch alone (the layer's history entry of this iteration).
* **Own-layer exact** (diagnostic): each of the k batches' statistics recomputed exactly for the
  change of layer ``l``'s own conv only: the conv input recorded in training at ``t − τ`` (kept by
  this script) convolved with θ^l_t, pooled with weight 1/k per iteration.
* **Oracle A** (the reference, as in the classifier study): the same k mini-batches (the preprocessed
  images of the current and the k − 1 previous iterations, and for the box head the RoIs sampled at
  each of those iterations, both kept by this script) run through the *current* network ``f_t``: all
  weights at θ_t, every CBN layer normalising with the fixed μ̄, σ̄² it used at iteration ``t``, and
  every backbone BN layer (plain BN, which normalises with the current batch in training) with the
  fixed statistics it used at ``t``, i.e. the current batch's mean and biased variance. This is a
  fixed function that reproduces the training forward of the current batch exactly (checked:
  ``current batch check`` below), the definition of the classifier study, where every norm layer is
  CBN. Implementation: a copy of the detector in eval mode (CBN in eval mode *is* BN with the running
  statistics) with those statistics loaded as running statistics; backbone → neck on each stored
  image batch, then the RoI extractor on the stored RoIs and the box head; each CBN layer's input is
  captured and the oracle is its mean and biased variance pooled over the k batches with weight 1/k
  per iteration (Eq. 9's weighting; equal to pooling all values when the k batches have the same
  size, as the images always do and the RoIs do when the sampler fills its quota).
* **Oracle B** (``--no-batch-bn-oracle`` skips it): the same, but each backbone BN normalises every
  batch with that batch's own statistics (BN's training function), so that the past batches do not
  carry the current batch's backbone statistics into the FPN. With the weights fixed (``--lr 0``)
  oracle B *is* the recorded past for the FPN's lateral layers (a test checks this), oracle A is not:
  with a per-batch BN backbone at 2 images per batch, A mostly measures how much the backbone
  statistics differ between batches, B the staleness of the past statistics. Both are reported, and
  their distance (B against A) is in the checks.

Errors, per layer (RMS over channels, dimensionless), μ*, σ* the oracle's (A or B):
``e_μ = rms_c((μ̂_c − μ*_c)/σ*_c)``, ``e_σ = rms_c((σ̂_c − σ*_c)/σ*_c)``.

Checks written with every measurement (``checks`` in the JSON): ``current_batch_<oracle>``, the largest
difference (in units of the batch std) between the oracle's statistics of the newest stored batch and
the batch statistics the layer recorded in training (0 up to float rounding if the oracle reproduces
the training forward); ``used_vs_running``, the largest difference between the window statistics
computed here and the layer's running statistics (``momentum=1``: they are what it normalised with);
``oracle_gap``, oracle B's errors against oracle A (layer-averaged).

Usage::

    OMP_NUM_THREADS=1 .venv/bin/python tools/analysis/detector_statistics.py --ks 2 4 8   # 1.5 min per k
    .venv/bin/python tools/analysis/detector_statistics.py --quick     # tiny data, seconds (tests)

Prints the tables; writes ``detector_statistics.{md,json,png}`` to ``--out`` (``docs/evidence``; with
``--quick``: the work directory).
"""
import argparse
import copy
import json
import math
import os
import os.path as osp
import time
from collections import deque

import torch

from common import REPO_ROOT, ensure_dir, fmt, markdown_table, plt

DEMO_CONFIG = osp.join(REPO_ROOT, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py')
#: the demo dataset (configs/_base_/datasets/demo_shapes_detection.py) and the tiny one of --quick
DEMO_DATA = dict(num_train=800, num_val=200, image_size=128, seed=0)
QUICK_DATA = dict(num_train=8, num_val=4, image_size=64, seed=0, min_objects=1, max_objects=3)

METHODS = ('CBN', 'Naive CBN', 'BN', 'Own-layer exact')
PLOTTED = ('CBN', 'Naive CBN', 'BN')
ORACLES = ('fixed', 'batch-BN')  # backbone BN fixed at the current batch's statistics / per batch
LAYER_TYPES = ('FPN lateral', 'FPN output', 'box head conv')


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
    from mmengine.config import Config
    cfg = Config.fromfile(DEMO_CONFIG)
    # momentum 1, running_stats='window': the running statistics are the window statistics just used
    cbn = dict(type='CBN', window=k, requires_grad=True, momentum=1.0, running_stats='window')
    # (the demo config's head_norm_cfg variable was resolved when it was parsed: set each module's)
    cfg.model.neck.norm_cfg = cbn
    cfg.model.roi_head.bbox_head.norm_cfg = cbn
    hooks = [h for h in cfg.custom_hooks if h['type'] != 'CBNBurnInHook']
    cfg.custom_hooks = [dict(type='CBNBurnInHook', burn_in=args.burn_in, by_epoch=False)] + hooks

    iters = args.iters
    cfg.train_cfg = dict(type='IterBasedTrainLoop', max_iters=iters, val_interval=iters + 1)
    cfg.val_cfg = cfg.val_dataloader = cfg.val_evaluator = None
    cfg.test_cfg = cfg.test_dataloader = cfg.test_evaluator = None
    cfg.param_scheduler = [
        dict(type='LinearLR', start_factor=0.001, by_epoch=False, begin=0, end=args.warmup),
        dict(type='MultiStepLR', by_epoch=False, begin=0, end=iters,
             milestones=[int(iters * 0.75), int(iters * 0.9)], gamma=0.1)]
    cfg.optim_wrapper.optimizer.lr = args.lr
    cfg.randomness = dict(seed=args.seed)
    cfg.default_hooks.checkpoint = None
    cfg.default_hooks.logger.interval = max(1, min(50, iters // 10))
    cfg.work_dir = work_dir
    cfg.experiment_name = f'detector_statistics_k{k}_{os.getpid()}_{time.time_ns()}'

    root = args.data_root.rstrip('/') + '/'
    size = args.generation['image_size']
    cfg.train_dataloader.batch_size = args.batch_size
    cfg.train_dataloader.dataset.data_root = root
    cfg.train_dataloader.dataset.generate = args.generation
    for step in cfg.train_dataloader.dataset.pipeline:
        if step['type'] == 'Resize':
            step['scale'] = (size, size)
    if args.quick:  # fewer proposals (as tests/test_tools.py)
        cfg.model.train_cfg.rpn_proposal.update(nms_pre=200, max_per_img=50)
    return cfg


# ------------------------------------------------------------------------------------------ maths
def pool(moments):
    """Pool per-iteration ``(mean, var)`` with weight 1/k each (Eq. 9-11's weighting), in float64."""
    from cbn_mmdet.ops.statistics import window_moments
    means = torch.stack([m.double() for m, _ in moments])
    vars_ = torch.stack([v.double() for _, v in moments])
    valid = torch.ones(len(moments) - 1, dtype=torch.float64)
    mean, var, _ = window_moments(means[-1], vars_[-1], means[:-1], vars_[:-1], valid)
    return mean, var


def errors(mean, var, o_mean, o_var, eps=1e-12):
    o_std = o_var.clamp_min(eps).sqrt()
    e_mu = (((mean - o_mean) / o_std) ** 2).mean().sqrt()
    e_sigma = (((var.clamp_min(0).sqrt() - o_std) / o_std) ** 2).mean().sqrt()
    return float(e_mu), float(e_sigma)


def window_statistics(layer):
    """After ``layer``'s training forward: ``{'CBN', 'Naive CBN', 'BN': (mean, var)}`` (float64), the
    window size used and the largest difference of the CBN statistics from the running statistics.
    ``None`` if the layer used no past iteration."""
    from cbn_mmdet.ops.statistics import window_moments
    head = layer.history_slots()[0]
    past = layer.past_window()
    if past is None:
        return None
    valid = past['valid'].double()
    batch_mean = layer.history_mean[head].double().clone()
    batch_var = layer.history_var[head].double().clone()
    cbn_mean, cbn_var, k_used = window_moments(batch_mean, batch_var, past['mean_compensated'].double(),
                                               past['var_compensated'].double(), valid)
    naive_mean, naive_var, _ = window_moments(batch_mean, batch_var, past['mean'].double(),
                                              past['var'].double(), valid)
    count = layer.history_count.double()
    n = count[head] + (count * valid).sum()
    running_var = layer.running_var.double() * (n - 1) / n  # momentum=1: σ̄²·n/(n−1)
    std = cbn_var.clamp_min(1e-12).sqrt()
    check = max(float(((layer.running_mean.double() - cbn_mean).abs() / std).max()),
                float(((running_var - cbn_var).abs() / cbn_var.clamp_min(1e-12)).max()))
    return dict(stats={'CBN': (cbn_mean, cbn_var), 'Naive CBN': (naive_mean, naive_var),
                       'BN': (batch_mean, batch_var)}, k=int(k_used), used_vs_running=check)


# ------------------------------------------------------------------------------------------ the hook
def make_study_hook(k, args):
    from mmengine.hooks import Hook
    from mmengine.model import is_model_wrapper
    from torch.nn.modules.batchnorm import _BatchNorm
    from cbn_mmdet.models import CrossIterationBatchNorm2d
    from cbn_mmdet.ops.statistics import batch_moments

    class DetectorStatisticsStudy(Hook):
        """Keeps the last k iterations' inputs; measures before the optimizer step (weights θ_t)."""
        priority = 'LOWEST'  # after CBNBurnInHook has set the window of this iteration

        def __init__(self):
            self.records, self.checks, self.losses = [], [], []
            self.kept = deque(maxlen=k)  # per iteration: images, rois, conv inputs (oldest first)
            self.start = args.burn_in + k - 1  # first iteration with k − 1 past entries
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
                    lambda mod, inp, out, name=name: self._on_cbn(name, mod))
                if args.own_layer:
                    self.convs[name].register_forward_pre_hook(
                        lambda mod, inp, name=name: self._on_conv_input(name, inp[0]))
            for name, layer in self.bn.items():
                layer.register_forward_pre_hook(lambda mod, inp, name=name: self._on_bn(name, inp[0]))
            runner.optim_wrapper.optimizer.register_step_pre_hook(self._before_step)
            self.runner = runner

        def before_train_iter(self, runner, batch_idx, data_batch=None):
            self.iter = runner.iter
            self.measuring = (runner.iter >= self.start and
                              (runner.iter - self.start) % args.interval == 0)
            self.current = dict(images=None, rois=None, conv_inputs={}, stats={}, calls={}, bn={})

        def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
            loss = (outputs or {}).get('loss')
            if loss is not None:
                self.losses.append(float(loss.detach() if hasattr(loss, 'detach') else loss))

        # -------------------------------------------------------------- recorders (training forward)
        def _on_images(self, module, inputs):
            self.current['images'] = inputs[0].detach().clone()

        def _on_rois(self, module, inputs):
            self.current['rois'] = inputs[1].detach().clone()

        def _on_conv_input(self, name, x):
            self.current['conv_inputs'][name] = x.detach().clone()

        def _on_cbn(self, name, layer):
            if not layer.training:
                return
            self.current['calls'][name] = self.current['calls'].get(name, 0) + 1
            if self.measuring:
                self.current['stats'][name] = window_statistics(layer)

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
            if len(self.kept) < k or any(s is None or s['k'] != k for s in stats.values()):
                print(f'[detector_statistics] iteration {self.iter}: window not full, skipped', flush=True)
                return
            if not all(self.cbn[name].history_open for name in stats):
                raise RuntimeError('a CBN layer has no open history entry for this iteration')
            if set(cur['bn']) != set(self.bn):
                raise RuntimeError('a backbone BN layer did not run in this iteration')
            oracles = {'fixed': self._oracle(stats, cur['bn'], batch_bn=False)}
            if args.batch_bn_oracle:
                oracles['batch-BN'] = self._oracle(stats, cur['bn'], batch_bn=True)
            own = self._own_layer() if args.own_layer else {}
            lr = float(self.runner.optim_wrapper.get_lr()['lr'][0])
            check = dict(k=k, iter=self.iter, lr=lr, rois=[int(e['rois'].shape[0]) for e in self.kept],
                         used_vs_running=max(s['used_vs_running'] for s in stats.values()))
            for oname, (pooled, newest) in oracles.items():
                worst = 0.0
                for li, (name, s) in enumerate(stats.items()):
                    o_mean, o_var = pooled[name]
                    methods = dict(s['stats'])
                    if name in own:
                        methods['Own-layer exact'] = own[name]
                    for method in METHODS:
                        if method not in methods:
                            continue
                        m, v = methods[method]
                        e_mu, e_sigma = errors(m, v, o_mean, o_var)
                        self.records.append(dict(k=k, iter=self.iter, lr=lr, oracle=oname, layer=name,
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

    return DetectorStatisticsStudy()


def run(k, args):
    """Train one detector with CBN(window=k); returns ``(records, checks, final loss, seconds)``."""
    from mmengine.runner import Runner
    import cbn_mmdet  # noqa: F401
    work_dir = ensure_dir(osp.join(args.work_dir, f'k{k}'))
    cfg = build_config(k, args, work_dir)
    runner = Runner.from_cfg(cfg)
    study = make_study_hook(k, args)
    runner.register_hook(study)
    start = time.perf_counter()
    runner.train()
    seconds = time.perf_counter() - start
    tail = study.losses[-min(50, len(study.losses)):]
    return study.records, study.checks, (sum(tail) / len(tail) if tail else float('nan')), seconds


# ------------------------------------------------------------------------------------------ output
def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float('nan')


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
            methods = [m for m in METHODS if select(sel, method=m)]
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
    methods = [m for m in METHODS if any(m in summary['overall']['fixed'].get(str(k), {}) for k in ks)]

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
        out.append('By layer type (mean over the 4 layers of the type and the measurement points):\n\n' +
                   markdown_table(['k', 'layers'] + metric_header, rows))
        for k in ks:
            per = summary['per_layer'][oracle].get(str(k), {})
            rows = [[f'{short_name(name)} (`{name}`)'] + cells(row) for name, row in per.items()]
            out.append(f'Per layer, k = {k}, oracle {"A" if oracle == "fixed" else "B"} (mean over '
                       'measurement points):\n\n' + markdown_table(['layer'] + metric_header, rows))
    return out


def plot(records, ks, layer_names, path):
    """Errors over training (layer average) and per layer, for oracle A and oracle B (columns)."""
    pyplot = plt()
    colours = {k: c for k, c in zip(sorted(ks), ('tab:blue', 'tab:orange', 'tab:green', 'tab:red'))}
    styles = {'CBN': '-', 'Naive CBN': '--', 'BN': ':', 'Own-layer exact': '-.'}
    oracles = [o for o in ORACLES if select(records, oracle=o)]
    fig, axes = pyplot.subplots(2, 2 * len(oracles), figsize=(6 * 2 * len(oracles), 7.5), squeeze=False)
    for col, oracle in enumerate(oracles):
        sel = select(records, oracle=oracle)
        tag = 'oracle A' if oracle == 'fixed' else 'oracle B'
        for row, key in enumerate(('e_mu', 'e_sigma')):
            ax = axes[row][col]
            for k in ks:
                its = sorted({r['iter'] for r in sel if r['k'] == k})
                for method in PLOTTED:
                    ys = [mean(r[key] for r in sel if r['k'] == k and r['method'] == method and
                               r['iter'] == i) for i in its]
                    ax.plot(its, ys, styles[method], color=colours[k], label=f'{method}, k={k}')
            ax.set_yscale('log')
            ax.set_xlabel('iteration')
            ax.set_ylabel('e_μ (mean error / σ*)' if key == 'e_mu' else 'e_σ (relative σ error)')
            ax.set_title(f'{tag}: {"mean" if key == "e_mu" else "std"}, average of {len(layer_names)} layers')
            ax.grid(True, which='both', alpha=0.3)
            ax = axes[row][len(oracles) + col]
            x = list(range(len(layer_names)))
            for k in ks:
                for method in ('CBN', 'Naive CBN', 'BN'):
                    ys = [mean(r[key] for r in sel if r['k'] == k and r['method'] == method and
                               r['layer'] == name) for name in layer_names]
                    ax.plot(x, ys, styles[method], marker='o', ms=3, color=colours[k], label=f'{method}, k={k}')
            ax.set_xticks(x)
            ax.set_xticklabels([short_name(n) for n in layer_names], rotation=60, fontsize=7)
            ax.set_yscale('log')
            ax.set_title(f'{tag}: {"e_μ" if key == "e_mu" else "e_σ"} per layer')
            ax.grid(True, which='both', alpha=0.3)
    axes[0][0].legend(fontsize=7, ncol=3)
    fig.suptitle('Faster R-CNN (demo), CBN in FPN + box head: window statistics vs the oracle '
                 '(A: backbone BN fixed at the current batch; B: backbone BN per batch)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--out', default=None, help='default docs/evidence (--quick: WORK_DIR)')
    parser.add_argument('--work-dir', default=None,
                        help='mmengine work directories WORK_DIR/k<k>/ (default '
                             'work_dirs/detector_statistics[_quick])')
    parser.add_argument('--ks', type=int, nargs='+', default=[4], help='CBN windows, one run each')
    parser.add_argument('--iters', type=int, default=None, help='training iterations (400)')
    parser.add_argument('--burn-in', type=int, default=None, help='iterations with window 1 (iters // 4)')
    parser.add_argument('--warmup', type=int, default=None, help='linear warm-up (iters // 8)')
    parser.add_argument('--interval', type=int, default=None, help='measure every N iterations (10)')
    parser.add_argument('--batch-size', type=int, default=2)
    parser.add_argument('--lr', type=float, default=None, help='default 0.04 · sqrt(batch size / 8)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--threads', type=int, default=1)
    parser.add_argument('--data-root', default=None,
                        help='default data/demo_shapes (the demo data; --quick: WORK_DIR/data, tiny)')
    parser.add_argument('--no-own-layer', dest='own_layer', action='store_false',
                        help='skip the own-layer-exact diagnostic (keeps every conv input of k iterations)')
    parser.add_argument('--no-batch-bn-oracle', dest='batch_bn_oracle', action='store_false',
                        help='skip the oracle variant with per-batch backbone BN')
    parser.add_argument('--quick', action='store_true',
                        help='tiny data (8 images of 64 px), 16 iterations, burn-in 4 (tests)')
    args = parser.parse_args(argv)
    if any(k < 2 for k in args.ks):
        parser.error('--ks: windows must be >= 2 (k = 1 is BN)')
    if args.quick:
        args.iters = args.iters or 16
        args.burn_in = 4 if args.burn_in is None else args.burn_in
        args.interval = args.interval or 3
        args.generation = QUICK_DATA
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', 'detector_statistics_quick')
        args.data_root = args.data_root or osp.join(args.work_dir, 'data')
    else:
        args.iters = args.iters or 400
        args.burn_in = args.iters // 4 if args.burn_in is None else args.burn_in
        args.interval = args.interval or 10
        args.generation = DEMO_DATA
        args.work_dir = args.work_dir or osp.join(REPO_ROOT, 'work_dirs', 'detector_statistics')
        args.data_root = args.data_root or osp.join(REPO_ROOT, 'data', 'demo_shapes')
    args.work_dir = osp.abspath(args.work_dir)
    args.data_root = osp.abspath(args.data_root)
    args.out = args.out or (args.work_dir if args.quick else osp.join(REPO_ROOT, 'docs', 'evidence'))
    args.warmup = max(1, args.iters // 8) if args.warmup is None else args.warmup
    args.lr = round(0.04 * math.sqrt(args.batch_size / 8), 4) if args.lr is None else args.lr
    torch.set_num_threads(args.threads)

    from cbn_mmdet.datasets.demo_shapes import make_demo_dataset
    make_demo_dataset(args.data_root, **args.generation)

    start = time.time()
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
    wall = time.time() - start
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
    md = (f'# Window statistics in the demo detector (item 1, detector)\n\nCommand: `{command}`\n\n'
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
    print(md)
    out = ensure_dir(args.out)
    with open(osp.join(out, 'detector_statistics.md'), 'w') as f:
        f.write(md)
    with open(osp.join(out, 'detector_statistics.json'), 'w') as f:
        json.dump(dict(args=vars(args), summary=summary, records=records, checks=checks,
                       final_loss={str(k): v for k, v in final_loss.items()},
                       seconds={str(k): v for k, v in seconds.items()}, wall_seconds=wall), f)
    if records:
        plot(records, args.ks, layer_names, osp.join(out, 'detector_statistics.png'))
    return 0


if __name__ == '__main__':
    raise SystemExit(main())
